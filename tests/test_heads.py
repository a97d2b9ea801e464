"""Heads registry, the image head, the label and representation modalities (DESIGN.md §1-2, §4).

Oracles: closed-form formulas written out here (log-softmax, Gaussian densities from
``torch.distributions``, a loop-based unpatchify), never the heads' own helpers.
"""

import pytest
import torch
import torch.nn.functional as F

import heads
from head_fakes import make_feats
from heads.image import ImageHead
from unidiff.errors import ConfigError, DataError
from unidiff.modality import BackboneOutput, Modality

C, H, W, D, P = 2, 8, 8, 32, 2
L = (H // P) * (W // P)
COMMON = dict(image_shape=(C, H, W), hidden_size=D, patch_size=P)


def fake_feats(B=3, R=0, seed=0):
    return make_feats(L, D, B, R, seed)


def randomize_(module, seed=1):
    """Give every parameter (zero-initialised outputs included) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module


def rms(x):
    return x.pow(2).flatten(1).mean(1).sqrt()


def layer_norm_ref(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


# --- registry: every built-in kind keeps the contract ------------------------------------------------
B = 4


def _label_case():
    m = heads.build_modality("label", name="y", **COMMON, num_classes=3)
    x = torch.tensor([0, 2, 1, 2])
    pred = torch.tensor([[1.0, 2.0, 1.0]]).log().expand(B, 3)  # p = (1/4, 1/2, 1/4)
    return m, x, pred, -torch.tensor([0.25, 0.25, 0.5, 0.25]).log()  # cross-entropy -log p_y


def _representation_case():
    m = heads.build_modality("representation", name="r", **COMMON, dim=2)
    x = torch.tensor([[1.0, 3.0], [0.0, 0.0], [2.0, -2.0], [1.0, 1.0]])
    return m, x, torch.zeros(B, 2), torch.tensor([5.0, 0.0, 4.0, 1.0])  # mean of squares over the 2 dims


def _masked_case():
    m = heads.build_modality("masked_image", name="m", **COMMON, mask_ratio=0.5)
    target = torch.full((B, C, H, W), 0.5)
    mask = torch.zeros(B, 1, H, W)
    mask[:, :, : H // 2] = 1  # top half visible
    target[:, :, : H // 2] = 9.0  # visible pixels: not part of the loss
    x = m.from_batch({"image": target, "mask": mask})
    return m, x, torch.zeros(B, C, H, W), torch.full((B,), 0.25)  # 0.5² on the masked pixels only


def _source_case():
    m = heads.build_modality("source_image", name="s", **COMMON, transform="invert")
    scale = torch.tensor([0.0, 0.5, 1.0, 2.0]).view(B, 1, 1, 1)
    return m, scale * torch.ones(B, C, H, W), torch.zeros(B, C, H, W), torch.tensor([0.0, 0.25, 1.0, 4.0])


CASES = {"label": _label_case, "representation": _representation_case, "masked_image": _masked_case,
         "source_image": _source_case}


@pytest.mark.parametrize("kind", heads.MODALITY_KINDS)
def test_every_builtin_kind_keeps_the_contract(kind):
    m, x, pred, want_loss = CASES[kind]()
    assert isinstance(m, Modality) and m.kind == kind and heads.modality_class(kind) is type(m)
    e = m.encode(x)
    assert e.shape == (B, C, H, W)
    torch.testing.assert_close(rms(e), torch.ones(B), rtol=1e-4, atol=1e-4)
    null = m.null_encoding(B)
    assert null.shape == (B, C, H, W) and torch.equal(null[0], null[-1])
    torch.testing.assert_close(rms(null), torch.ones(B), rtol=1e-4, atol=1e-4)
    # the null encoding is learned: a gradient reaches it and one step moves it
    (null * torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(0))).sum().backward()
    moved = [p for p in m.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert moved
    with torch.no_grad():
        for p in moved:
            p -= 0.1 * p.grad
    assert not torch.allclose(m.null_encoding(B), null.detach())
    torch.testing.assert_close(m.loss(pred, x), want_loss)
    out = m.head(fake_feats(B=B))
    assert m.expected_encoding(out).shape == (B, C, H, W)
    keep = torch.tensor([2, 0])
    torch.testing.assert_close(m.encode(m.select(x, keep)), e[keep])
    with pytest.raises(ConfigError, match=rf"'{kind}'.*'colour'"):
        heads.build_modality(kind, name="m", **COMMON, colour=1)


def _rank(x):
    return int(torch.linalg.matrix_rank(x.detach().flatten(1).double(), rtol=1e-4))  # float32 noise is not rank


F_B = fake_feats(B=B)
FR_B = fake_feats(B=B, R=2)
FR_B_OTHER_REGISTERS = BackboneOutput(tokens=FR_B.tokens, registers=fake_feats(B=B, R=2, seed=9).registers,
                                      c=FR_B.c, aux_loss=FR_B.aux_loss)
LABEL_10 = heads.build_modality("label", name="m", **COMMON, num_classes=10)


def _n_params(module):
    return sum(p.numel() for p in module.parameters())
X_B = torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(5)) * 2 - 1
BASE = {"label": dict(num_classes=10), "representation": dict(dim=5), "masked_image": {}, "source_image": {}}


def _blockwise(x, size):
    """x (B, C', H, W) is constant on size×size blocks."""
    return torch.equal(x, x[:, :, ::size, ::size].repeat_interleave(size, 2).repeat_interleave(size, 3))


# kind -> option -> (a non-default value, what it must do). An E-wide embedding maps its inputs into
# an affine E-dim subspace, so the encodings (before the per-row unit-RMS scale) have rank <= E + 1.
EFFECTS = {
    "label": {
        "num_classes": (3, lambda m: m.head(F_B).shape == (B, 3)),
        "embed_dim": (2, lambda m: _rank(m.class_encodings()) <= 3),
        # a hidden layer of 16: D*16 + 16 more weights, and the output reads 16 wide instead of D
        "head_hidden": (16, lambda m: _n_params(m.classifier) == _n_params(LABEL_10.classifier) + D * 16 + 16 + (16 - D) * 10),
        # the patch-token mean: the registers are not read any more
        "head_pool": ("tokens", lambda m: torch.equal(randomize_(m).head(FR_B), m.head(FR_B_OTHER_REGISTERS))),
    },
    "representation": {
        "dim": (3, lambda m: m.head(F_B).shape == (B, 3)),
        "embed_dim": (2, lambda m: _rank(m.encode(torch.randn(8, 5))) <= 3),
    },
    "masked_image": {
        "mask_ratio": (0.25, lambda m: float(1 - m.random_mask(B, torch.device("cpu")).mean()) == 0.25),
        "mask_patch": (4, lambda m: _blockwise(m.random_mask(B, torch.device("cpu")), 4)
                       and not _blockwise(heads.build_modality("masked_image", name="m", **COMMON).random_mask(
                           B, torch.device("cpu"), torch.Generator().manual_seed(0)), 4)),
    },
    "source_image": {
        "transform": ("invert", lambda m: torch.equal(m.from_batch({"image": X_B}), -X_B)),
        "source_channels": (1, lambda m: m.head(F_B).shape == (B, 1, H, W)),
        "downsample_factor": (4, lambda m: _blockwise(m.from_batch({"image": X_B}), 4)),
    },
}


@pytest.mark.parametrize("kind", heads.MODALITY_KINDS)
def test_each_listed_option_is_accepted_and_takes_effect(kind):
    listed = heads.modality_options(kind)
    assert set(listed) == set(EFFECTS[kind])  # exactly the documented options, none of the common ones
    for option, (value, check) in EFFECTS[kind].items():
        opts = {**BASE[kind], option: value}
        if kind == "source_image" and option != "transform":
            opts["transform"] = "edges" if option == "source_channels" else "downsample"
        assert check(heads.build_modality(kind, name="m", **COMMON, **opts)), (kind, option)


def test_downsample_factor_sets_the_block_size_of_the_view():
    x = torch.rand(2, C, H, W, generator=torch.Generator().manual_seed(0))
    for f in (2, 4):
        m = heads.build_modality("source_image", name="s", **COMMON, transform="downsample", downsample_factor=f)
        blocks = x.reshape(2, C, H // f, f, W // f, f).mean(dim=(3, 5))  # block means, written out
        torch.testing.assert_close(m.from_batch({"image": x}), blocks.repeat_interleave(f, 2).repeat_interleave(f, 3))


def test_base_modality_defaults():
    m = Modality("v", (C, H, W), D, P)
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])
    torch.testing.assert_close(m.average_predictions([a, b]), torch.tensor([[2.0, 4.0]]))
    avg = m.average_predictions([{"u": a, "w": b}, {"u": b, "w": a}])
    torch.testing.assert_close(avg["u"], torch.tensor([[2.0, 4.0]]))
    assert m.metrics(a, a) == {} and m.npz_key is None and m.tasks == ()
    assert m.to_array(torch.tensor([1, 2])).dtype.name == "int64" and m.to_array(a).dtype.name == "float32"
    assert m.to_array({"u": a}) is None
    with pytest.raises(DataError, match="where"):
        m.from_array(a.numpy(), "where")
    assert m.resolve_options({"x": 1}, None) == {"x": 1}
    assert m.default_inputs(3, lambda: {"image": torch.zeros(3, C, H, W)}) is None  # no batch["v"]
    torch.testing.assert_close(m.default_inputs(2, lambda: {"v": a}), a)


def test_unknown_kind_names_it_and_the_allowed_set():
    with pytest.raises(ConfigError, match=r"'audio'.*label.*representation.*masked_image.*source_image"):
        heads.build_modality("audio", name="a", **COMMON)


@pytest.mark.parametrize(
    "kind,opts,pattern",
    [
        ("label", dict(num_classes=3, colour=1), r"'label'.*'colour'"),
        ("label", dict(), r"'label'.*'num_classes'"),  # missing required option
        ("label", dict(num_classes="ten"), r"'label'.*'num_classes'"),
        ("label", dict(num_classes=1), r"'label'.*'num_classes'"),
        ("label", dict(num_classes=3, head_pool="max"), r"'label'.*'head_pool'.*concat"),
        ("label", dict(num_classes=3, head_hidden=-1), r"'label'.*'head_hidden'"),
        ("representation", dict(dim=4, embed_dim=0), r"'representation'.*'embed_dim'"),
        ("masked_image", dict(mask_ratio=1.5), r"'masked_image'.*'mask_ratio'"),
        ("masked_image", dict(mask_patch=3), r"'masked_image'.*mask_patch"),
        ("source_image", dict(transform="blur"), r"'source_image'.*'transform'"),
        ("source_image", dict(transform="invert", source_channels=1), r"'source_image'.*'source_channels'"),
        ("source_image", dict(transform="downsample", downsample_factor=3), r"'source_image'.*downsample_factor"),
    ],
)
def test_bad_options_raise_config_error_naming_option_and_kind(kind, opts, pattern):
    with pytest.raises(ConfigError, match=pattern):
        heads.build_modality(kind, name="m", **COMMON, **opts)


# --- image head ----------------------------------------------------------------------------------
@pytest.mark.parametrize("R", [0, 2])
def test_image_head_zero_at_init(R):
    head = heads.build_image_head((C, H, W), D, P)
    assert isinstance(head, ImageHead)
    out = head(fake_feats(R=R))
    assert out.shape == (3, C, H, W)
    assert torch.count_nonzero(out) == 0


def test_image_head_matches_loop_reference():
    """adaLN LayerNorm + Linear per token, then token (i, j)'s p*p*C vector fills patch (i, j)."""
    head = randomize_(ImageHead((C, H, W), D, P))
    f = fake_feats(B=2)
    out = head(f)
    lin = head.norm.ada[1]
    shift, scale = (F.silu(f.c) @ lin.weight.T + lin.bias).chunk(2, dim=-1)
    h = layer_norm_ref(f.tokens) * (1 + scale[:, None]) + shift[:, None]
    y = h @ head.linear.weight.T + head.linear.bias  # (B, L, P*P*C)
    ref = torch.empty(2, C, H, W)
    gw = W // P
    for l in range(L):
        i, j = divmod(l, gw)
        for p1 in range(P):
            for p2 in range(P):
                for c in range(C):
                    ref[:, c, i * P + p1, j * P + p2] = y[:, l, (p1 * P + p2) * C + c]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_image_head_gradient_reaches_output_layer():
    head = heads.build_image_head((C, H, W), D, P)
    (head(fake_feats()) * torch.randn(3, C, H, W)).sum().backward()
    assert head.linear.weight.grad.abs().sum() > 0


# --- label ---------------------------------------------------------------------------------------
K = 5


def make_label(**kw):
    return heads.build_modality("label", name="label", **COMMON, num_classes=K, **kw)


def test_label_encode_and_null_are_unit_rms():
    m = make_label()
    y = torch.tensor([0, 3, 4, 3])
    e = m.encode(y)
    assert e.shape == (4, C, H, W)
    torch.testing.assert_close(rms(e), torch.ones(4), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(e[1], e[3])  # same class, same map
    assert not torch.allclose(e[0], e[1])
    null = m.null_encoding(4)
    assert null.shape == (4, C, H, W)
    torch.testing.assert_close(rms(null), torch.ones(4), rtol=1e-4, atol=1e-4)
    params = [p for p in m.parameters() if p.requires_grad]
    assert any(p.data_ptr() == m.null.weight.data_ptr() for p in params)
    null.sum().backward()
    # d/dx of the sum of a unit-RMS map is not zero for a generic x, so the null is learned.
    assert m.null.weight.grad is not None and m.null.weight.grad.abs().sum() > 0


def test_label_encode_matches_class_table():
    m = make_label()
    y = torch.tensor([2, 0, 4])
    torch.testing.assert_close(m.encode(y), m.class_encodings()[y], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("R", [0, 3])
def test_label_head_uniform_at_init(R):
    m = make_label()
    logits = m.head(fake_feats(R=R))
    assert logits.shape == (3, K)
    torch.testing.assert_close(logits.softmax(-1), torch.full((3, K), 1.0 / K))


def test_label_head_pools_registers_when_present():
    m = randomize_(make_label())
    f = fake_feats(R=2)
    g = BackboneOutput(tokens=torch.randn_like(f.tokens), registers=f.registers, c=f.c, aux_loss=f.aux_loss)
    torch.testing.assert_close(m.head(f), m.head(g))  # tokens ignored when registers exist
    f0, g0 = fake_feats(R=0), fake_feats(R=0, seed=5)
    g0 = BackboneOutput(tokens=g0.tokens, registers=f0.registers, c=f0.c, aux_loss=f0.aux_loss)
    assert not torch.allclose(m.head(f0), m.head(g0))  # ... and used (mean-pooled) otherwise
    perm = torch.randperm(L)
    p0 = BackboneOutput(tokens=f0.tokens[:, perm], registers=f0.registers, c=f0.c, aux_loss=f0.aux_loss)
    torch.testing.assert_close(m.head(f0), m.head(p0), rtol=1e-5, atol=1e-5)  # a mean: order-free


def test_label_head_concat_reads_registers_and_tokens():
    m = randomize_(make_label(head_pool="concat", head_hidden=8))
    f, other = fake_feats(R=2), fake_feats(R=2, seed=7)
    new_tokens = BackboneOutput(tokens=other.tokens, registers=f.registers, c=f.c, aux_loss=f.aux_loss)
    new_registers = BackboneOutput(tokens=f.tokens, registers=other.registers, c=f.c, aux_loss=f.aux_loss)
    assert not torch.allclose(m.head(f), m.head(new_tokens))  # the tokens are read ...
    assert not torch.allclose(m.head(f), m.head(new_registers))  # ... and so are the registers
    perm = BackboneOutput(tokens=f.tokens[:, torch.randperm(L)], registers=f.registers, c=f.c, aux_loss=f.aux_loss)
    torch.testing.assert_close(m.head(f), m.head(perm), rtol=1e-5, atol=1e-5)  # both means: order-free
    # without registers the register half is zero: the head still reads the tokens
    m0, f0 = randomize_(make_label(head_pool="concat")), fake_feats(R=0)
    g0 = BackboneOutput(tokens=fake_feats(R=0, seed=7).tokens, registers=f0.registers, c=f0.c, aux_loss=f0.aux_loss)
    assert m0.head(f0).shape == (3, K) and not torch.allclose(m0.head(f0), m0.head(g0))


def test_label_loss_and_log_likelihood_match_formulas():
    m = make_label()
    logits = torch.randn(6, K, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3, 4, 2])
    ref_logp = logits[torch.arange(6), y] - torch.logsumexp(logits, dim=1)
    torch.testing.assert_close(m.loss(logits, y), -ref_logp)
    torch.testing.assert_close(m.log_likelihood(logits, y), ref_logp)
    assert torch.equal(m.readout(logits), logits.argmax(1))
    acc = m.metrics(torch.tensor([0, 1, 1, 3]), torch.tensor([0, 1, 2, 2]))["accuracy"]
    assert float(acc) == pytest.approx(0.5)


def test_label_expected_encoding_onehot_and_uniform():
    m = make_label()
    table = m.class_encodings()
    logits = torch.full((K, K), float("-inf"))
    logits.fill_diagonal_(0.0)  # softmax -> exactly one-hot
    assert torch.equal(m.expected_encoding(logits), table)
    uni = m.expected_encoding(torch.zeros(2, K))
    torch.testing.assert_close(uni, table.mean(0, keepdim=True).expand(2, -1, -1, -1), rtol=1e-5, atol=1e-6)


def test_label_gradients():
    m = make_label()
    f = fake_feats()
    y = torch.tensor([1, 2, 3])
    m.loss(m.head(f), y).mean().backward()
    assert m.classifier.out.weight.grad.abs().sum() > 0
    logits = torch.randn(3, K, requires_grad=True)
    (m.expected_encoding(logits) * torch.randn(3, C, H, W)).sum().backward()
    assert logits.grad.abs().sum() > 0
    assert m.embed.weight.grad.abs().sum() > 0  # the encoder trains through Â too


def test_label_bad_labels_raise_data_error():
    m = make_label()
    with pytest.raises(DataError, match=r"'label'.*7.*\[0, 5\)"):
        m.encode(torch.tensor([1, 7]))
    with pytest.raises(DataError, match=r"-1"):
        m.loss(torch.zeros(1, K), torch.tensor([-1]))
    with pytest.raises(DataError, match="integer"):
        m.encode(torch.tensor([1.0, 2.0]))


# --- representation ------------------------------------------------------------------------------
DIM = 6


def make_rep(**kw):
    return heads.build_modality("representation", name="representation", **COMMON, dim=DIM, **kw)


def test_representation_encode_null_shapes_and_rms():
    m = make_rep(embed_dim=8)
    r = torch.randn(4, DIM)
    e = m.encode(r)
    assert e.shape == (4, C, H, W)
    torch.testing.assert_close(rms(e), torch.ones(4), rtol=1e-4, atol=1e-4)
    null = m.null_encoding(2)
    assert null.shape == (2, C, H, W) and m.null.weight.requires_grad
    torch.testing.assert_close(rms(null), torch.ones(2), rtol=1e-4, atol=1e-4)
    with pytest.raises(DataError, match=r"\(B, 6\)"):
        m.encode(torch.randn(4, DIM + 1))


@pytest.mark.parametrize("R", [0, 2])
def test_representation_head_zero_at_init(R):
    m = make_rep()
    out = m.head(fake_feats(R=R))
    assert out.shape == (3, DIM) and torch.count_nonzero(out) == 0


def test_representation_loss_likelihood_metrics():
    m = make_rep()
    g = torch.Generator().manual_seed(4)
    pred, r = torch.randn(5, DIM, generator=g), torch.randn(5, DIM, generator=g)
    torch.testing.assert_close(m.loss(pred, r), F.mse_loss(pred, r, reduction="none").mean(1))
    ref_ll = torch.distributions.Normal(pred, 1.0).log_prob(r).sum(1)
    torch.testing.assert_close(m.log_likelihood(pred, r), ref_ll)
    assert torch.equal(m.readout(pred), pred)
    met = m.metrics(pred, r)
    cos = (pred * r).sum(1) / (pred.norm(dim=1) * r.norm(dim=1))
    assert float(met["cosine"]) == pytest.approx(float(cos.mean()), rel=1e-5)
    assert float(met["mse"]) == pytest.approx(float(((pred - r) ** 2).mean()), rel=1e-5)


def test_representation_gradients():
    m = make_rep()
    m.loss(m.head(fake_feats(R=1)), torch.randn(3, DIM)).mean().backward()
    assert m.regressor.out.weight.grad.abs().sum() > 0
    pred = torch.randn(3, DIM, requires_grad=True)
    (m.expected_encoding(pred) * torch.randn(3, C, H, W)).sum().backward()
    assert pred.grad.abs().sum() > 0
    torch.testing.assert_close(m.expected_encoding(pred.detach()), m.encode(pred.detach()))


def test_label_average_predictions_averages_probabilities_not_logits():
    import heads

    mod = heads.build_modality("label", name="label", image_shape=(1, 8, 8), hidden_size=16, patch_size=2, num_classes=3)
    a = torch.tensor([[10.0, 0.0, 0.0]])  # confident class 0
    b = torch.tensor([[0.0, 1.0, 0.9]])  # unsure, slight class 1
    avg = mod.average_predictions([a, b])
    expected = (a.softmax(-1) + b.softmax(-1)) / 2
    torch.testing.assert_close(avg.softmax(-1), expected)
    # a case where the two disagree: each draw is sure of a different class; the logit mean is flat
    # (argmax class 0) while the probability mean puts all mass on classes 1 and 2.
    e, f = torch.tensor([[0.0, 10.0, -10.0]]), torch.tensor([[0.0, -10.0, 10.0]])
    assert mod.readout((e + f) / 2).item() == 0
    assert mod.readout(mod.average_predictions([e, f])).item() in (1, 2)
