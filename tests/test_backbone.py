"""The hybrid backbone: pattern factory, adaLN-Zero, embeddings, save/load, compile, autocast."""

import pytest
import torch

from unidiff.errors import ConfigError
from unidiff.model import UnifiedModel
from unidiff.models.attention import Attention
from unidiff.models.backbone import HybridBackbone, parse_pattern, validate_backbone_options
from unidiff.models.embed import PatchEmbed, TimestepEmbedder, patchify, sincos_2d, unpatchify
from unidiff.models.moe import MoE
from unidiff.models.presets import PRESETS, get_preset, parameter_table
from unidiff.models.scan import ScanMixer


def debug_backbone(**kw):
    torch.manual_seed(0)
    opts = get_preset("debug")
    opts.update(kw)
    return HybridBackbone(in_channels=1, input_size=(8, 8), **opts)


def randomize_zero_inits(model, seed=1):
    """Open every adaLN gate (zero at init) so gradients reach the residual branches."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_pattern_rejects_unknown_character_naming_allowed_set():
    with pytest.raises(ConfigError, match=r"unknown character.*'X'.*'M' \(mamba\)"):
        parse_pattern("MEX*")
    with pytest.raises(ConfigError, match="non-empty"):
        parse_pattern("")
    assert parse_pattern("M*E-") == ("M", "*", "E", "-")


def test_factory_builds_one_sublayer_per_character_and_cycles_scan_orders():
    bb = debug_backbone(pattern="MEM*M-MM")
    kinds = [layer.kind for layer in bb.layers]
    assert kinds == list("MEM*M-MM")
    types = {"M": ScanMixer, "E": MoE, "*": Attention}
    for layer in bb.layers:
        if layer.kind in types:
            assert isinstance(layer.mixer, types[layer.kind])
    # The k-th M sublayer scans row, row reversed, column, column reversed, then row again (§5).
    mixers = [layer.mixer for layer in bb.layers if layer.kind == "M"]
    assert [m.order for m in mixers] == ["row", "row_rev", "col", "col_rev", "row"]
    # The patch grid of an 8x8 input at patch 2 is 4x4; the visiting orders written out by hand.
    row = list(range(16))
    col = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15]
    expected = [row, row[::-1], col, col[::-1], row]
    assert [m.perm.tolist() for m in mixers] == expected
    for m in mixers:  # the inverse restores the row-major layout
        x = torch.arange(16)
        assert x[m.perm][m.inv_perm].tolist() == row
    assert [l.mixer.order for l in debug_backbone(pattern="MM", scan="bidirectional").layers] == ["bidirectional"] * 2


def test_unknown_backbone_option_and_bad_patch_size_are_config_errors():
    with pytest.raises(ConfigError, match=r"\['hiden_size'\]"):
        validate_backbone_options({"hiden_size": 3})
    with pytest.raises(ConfigError, match="not divisible by the patch size 3"):
        PatchEmbed(1, (8, 8), 3, 16)
    with pytest.raises(ConfigError, match="scan="):
        debug_backbone(scan="diagonal")
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_preset("huge")


def test_patchify_unpatchify_are_inverse_and_row_major():
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, 4)  # (2, 6, 48)
    assert tokens.shape == (2, 6, 48)
    assert torch.equal(unpatchify(tokens, 4, (2, 3)), x)
    # token 1 is the patch in row 0, column 1 (row-major), pixel (0, 0) channel 0 first
    assert torch.equal(tokens[:, 1, 0], x[:, 0, 0, 4])


def test_sincos_2d_separates_rows_and_columns():
    pe = sincos_2d(16, (3, 4)).view(3, 4, 16)
    # first half depends on the row only, second half on the column only
    assert torch.allclose(pe[:, 0, :8], pe[:, 3, :8])
    assert torch.allclose(pe[0, :, 8:], pe[2, :, 8:])
    assert not torch.allclose(pe[0, 0], pe[1, 0])
    assert torch.allclose(pe[0, 0, :4], torch.zeros(4))  # sin(0)
    assert torch.allclose(pe[0, 0, 4:8], torch.ones(4))  # cos(0)


def test_residual_branches_are_closed_at_init():
    bb = debug_backbone()
    z, t = torch.randn(3, 1, 8, 8), torch.randint(0, 1000, (3,))
    out = bb(z, t)
    # identity stack: the features are the final norm of the embedded input, whatever t is
    ref = bb.final_norm(torch.cat([bb.patch_embed(z), bb.registers.expand(3, -1, -1)], 1))
    assert torch.allclose(out.tokens, ref[:, :16], atol=1e-6)
    assert torch.allclose(out.registers, ref[:, 16:], atol=1e-6)


def test_whole_denoiser_outputs_zero_at_init():
    torch.manual_seed(0)
    model = UnifiedModel(image_shape=(1, 8, 8), backbone_config=get_preset("debug"),
                         modality_configs=[{"name": "label", "kind": "label", "num_classes": 10}])
    out = model(torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)))
    assert torch.count_nonzero(out.image) == 0
    assert torch.count_nonzero(out.aux["label"]) == 0  # uniform class probabilities
    assert model.modality_of_kind("label") == "label" and model.modality_of_kind("representation") is None


def test_gradients_reach_every_parameter():
    bb = debug_backbone()
    randomize_zero_inits(bb)
    z, t = torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,))
    out = bb(z, t)
    (out.tokens.pow(2).mean() + out.registers.pow(2).mean()).backward()
    missing = [n for n, p in bb.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_moe_stats_only_when_asked():
    bb = debug_backbone()
    randomize_zero_inits(bb)
    z, t = torch.randn(3, 1, 8, 8), torch.randint(0, 1000, (3,))
    moes = [layer.mixer for layer in bb.layers if isinstance(layer.mixer, MoE)]
    assert moes
    plain = bb(z, t)  # a sampling/eval forward: no statistic computed, nothing returned
    assert plain.stats == {} and all(m.last_load.abs().sum() == 0 for m in moes)
    asked = bb(z, t, collect_stats=True)
    torch.testing.assert_close(asked.tokens, plain.tokens, rtol=0, atol=0)  # the flag changes no output
    # the stats are the mean over MoE sublayers of each one's own load of this forward
    load = torch.stack([m.last_load for m in moes]).mean(0)
    torch.testing.assert_close(asked.stats["moe/load"], load)
    torch.testing.assert_close(load.sum(), torch.tensor(1.0))
    assert set(asked.stats) == {"moe/load", "moe/load_max_over_mean", "moe/router_entropy", "moe/bias_abs_max"}


def test_save_load_round_trip_exact(tmp_path):
    bb = debug_backbone()
    randomize_zero_inits(bb)
    bb.save_pretrained(tmp_path / "bb")
    loaded = HybridBackbone.from_pretrained(tmp_path / "bb")
    z, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    for (k, v), (k2, v2) in zip(bb.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # Weights are bit-identical (above); outputs may differ by an ulp because the loaded tensors
    # live in differently aligned memory and CPU matmul kernels pick their SIMD path by alignment.
    torch.testing.assert_close(bb(z, t).tokens, loaded(z, t).tokens, rtol=0, atol=1e-6)
    assert loaded.config.pattern == bb.config.pattern


def test_unified_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = UnifiedModel(image_shape=(1, 8, 8), backbone_config=get_preset("debug"),
                         modality_configs=[{"name": "label", "kind": "label", "num_classes": 10}])
    randomize_zero_inits(model)
    model.save_pretrained(tmp_path / "m")
    loaded = UnifiedModel.from_pretrained(tmp_path / "m")
    z, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    a, b = model(z, t), loaded(z, t)
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=1e-6)  # an ulp at most (see above)
    torch.testing.assert_close(a.aux["label"], b.aux["label"], rtol=0, atol=1e-6)


def test_determinism_under_seed():
    a, b = debug_backbone(), debug_backbone()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    randomize_zero_inits(a)
    randomize_zero_inits(b)
    z, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    assert torch.equal(a(z, t).tokens, b(z, t).tokens)  # same seed: same weights, same forward
    c = debug_backbone()
    randomize_zero_inits(c, seed=2)
    assert not torch.equal(a(z, t).tokens, c(z, t).tokens)  # and the check can tell them apart


def test_bf16_autocast_close_to_fp32():
    bb = debug_backbone()
    randomize_zero_inits(bb)
    z, t = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,))
    ref = bb(z, t).tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = bb(z, t).tokens
    assert low.dtype in (torch.bfloat16, torch.float32)
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_torch_compile_matches_eager():
    bb = debug_backbone()
    randomize_zero_inits(bb)
    bb.eval()
    z, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 900])
    ref = bb(z, t).tokens
    compiled = torch.compile(bb)
    out = compiled(z, t).tokens
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_presets_build_and_moe_active_count_below_total():
    table = parameter_table((4, 32, 32))
    assert set(table) == set(PRESETS)
    for name, row in table.items():
        assert 0 < row["active"] <= row["total"], name
    assert table["nano"]["sublayers"] == 52
    assert table["S"]["active"] < table["S"]["total"]  # routed experts count top_k / num_experts
    assert table["S"]["total"] < table["B"]["total"] < table["L"]["total"] < table["XL"]["total"]


def test_timestep_features_are_dit_cos_sin_of_geometric_frequencies():
    t = torch.tensor([0, 1, 17, 500, 999])
    f = TimestepEmbedder(8, freq_dim=16).frequencies(t).double()  # (5, 16): [cos | sin]
    omega = 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 8)  # DiT: max_period^(-i/half)
    args = t.double()[:, None] * omega[None]
    torch.testing.assert_close(f, torch.cat([args.cos(), args.sin()], dim=1), atol=5e-4, rtol=0)
