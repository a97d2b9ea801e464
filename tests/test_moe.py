"""MoE FFN (DESIGN.md §5): parity with transformers' Nemotron-H, dispatch vs a naive per-token loop,
aux-loss-free balancing, aux loss, gradients, bf16 autocast, torch.compile, distributed bias sync."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from unidiff.errors import ConfigError
from unidiff.models import moe as moe_mod
from unidiff.models.moe import DenseMLP, MoE, TopkRouter, update_moe_biases

D, E, K, FF, FS = 32, 8, 2, 24, 40  # hidden, experts, top-k, expert width, shared width


def _hf_config(latent=None, n_group=1, topk_group=1, scale=2.5):
    from transformers import NemotronHConfig

    cfg = NemotronHConfig(
        hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=FF,
        moe_shared_expert_intermediate_size=FS, moe_latent_size=latent, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=True, routed_scaling_factor=scale,
        mlp_hidden_act="relu2", mlp_bias=False,
    )
    cfg._experts_implementation = "eager"  # transformers' readable per-expert loop, no kernels
    return cfg


def _randomise(module, bias_scale=0.05):
    """Random weights everywhere (transformers leaves expert weights uninitialised) and a non-zero
    correction bias large enough to change the selection."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, bias_scale)


def _ours(latent=None, **kw):
    return MoE(D, E, K, intermediate_size=FF, shared_intermediate_size=FS, latent_size=latent, **kw)


def _naive(m: MoE, x):
    """Per-token reference: y_t = fc2(Σ_k w_tk expert_k(fc1(x_t))) + shared(x_t)."""
    x_TD = x.reshape(-1, D)
    idx, w, _ = m.gate(x_TD)
    ys = []
    for t in range(x_TD.shape[0]):
        h = m.fc1_latent_proj(x_TD[t])
        acc = torch.zeros_like(h)
        for k in range(K):
            e = idx[t, k]
            acc = acc + w[t, k] * (m.experts.down_proj[e] @ F.relu(m.experts.up_proj[e] @ h) ** 2)
        y = m.fc2_latent_proj(acc)
        if m.shared_experts is not None:
            y = y + m.shared_experts(x_TD[t])
        ys.append(y)
    return torch.stack(ys).reshape(x.shape)


def _sorted_routing(idx, w):
    # top-k order is an implementation detail (transformers uses sorted=False): compare as sets.
    idx_s, perm = idx.sort(dim=-1)
    return idx_s, w.gather(1, perm)


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_router_matches_transformers(n_group, topk_group):
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter

    hf = NemotronHTopkRouter(_hf_config(n_group=n_group, topk_group=topk_group))
    _randomise(hf)
    ours = TopkRouter(D, E, K, routed_scaling_factor=2.5, n_group=n_group, topk_group=topk_group)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(64, D)
    _, hf_w, hf_idx = hf(x)
    idx, w, scores = ours(x)
    assert torch.equal(*(_sorted_routing(idx, w)[0], _sorted_routing(hf_idx, hf_w)[0]))
    torch.testing.assert_close(_sorted_routing(idx, w)[1], _sorted_routing(hf_idx, hf_w)[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scores, torch.sigmoid(x @ hf.weight.T))
    # The bias must actually have mattered, or this test could not tell biased from unbiased selection.
    ours.e_score_correction_bias.zero_()
    assert not torch.equal(ours(x)[0].sort(-1)[0], idx.sort(-1)[0])


@pytest.mark.parametrize("latent", [None, 16])
def test_moe_matches_transformers(latent):
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    hf = NemotronHMoE(_hf_config(latent=latent))
    _randomise(hf)
    ours = _ours(latent, routed_scaling_factor=2.5)
    ours.load_state_dict(hf.state_dict())  # strict: same names and layouts
    x = torch.randn(3, 7, D)
    y, aux = ours(x)
    torch.testing.assert_close(y, hf(x), rtol=1e-5, atol=1e-5)
    assert aux.item() == 0.0


def test_dense_mlp_matches_transformers():
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMLP

    hf = NemotronHMLP(_hf_config(), intermediate_size=FS)
    ours = DenseMLP(D, FS)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(5, D)
    torch.testing.assert_close(ours(x), hf(x))


@pytest.mark.parametrize("latent", [None, 16])
@pytest.mark.parametrize("grouped", [True, False])
def test_dispatch_matches_naive_loop(latent, grouped, monkeypatch):
    if grouped and moe_mod._GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    calls = {"grouped": 0}
    real = moe_mod._can_use_grouped_mm

    def spy(*a):
        ok = grouped and real(*a)
        calls["grouped"] += ok
        return ok

    monkeypatch.setattr(moe_mod, "_can_use_grouped_mm", spy)
    torch.manual_seed(0)
    m = _ours(latent)
    _randomise(m)
    x = torch.randn(2, 9, D)
    y, _ = m(x)
    torch.testing.assert_close(y, _naive(m, x), rtol=1e-5, atol=1e-5)
    assert calls["grouped"] == (1 if grouped else 0)  # the path under test was the one taken


def test_dispatch_handles_idle_experts():
    # Route every token to experts {0, 1}: six experts get zero slots (empty groups/slices).
    m = MoE(D, E, K, intermediate_size=FF, shared_intermediate_size=None)
    _randomise(m, bias_scale=0.0)
    m.gate.e_score_correction_bias[:2] = 10.0
    x = torch.randn(2, 5, D)
    y, _ = m(x, collect_stats=True)
    torch.testing.assert_close(y, _naive(m, x), rtol=1e-5, atol=1e-5)
    assert m.last_load[2:].sum() == 0 and torch.allclose(m.last_load[:2], torch.tensor([0.5, 0.5]))


def _load_cv(load):
    return (load.std(unbiased=False) / load.mean()).item()


def test_bias_balancing_evens_out_skewed_load():
    torch.manual_seed(0)
    m = MoE(16, E, K, intermediate_size=8, bias_update_rate=0.02)
    u = torch.randn(16)
    u = u / u.norm()
    with torch.no_grad():
        m.gate.weight.normal_(0.0, 0.1)
        m.gate.weight[0] += 4 * u  # every token's input leans toward u: expert 0 wins everywhere
        m.gate.weight[1] += 2 * u
    m.train()

    def batch():
        return torch.randn(4, 32, 16) * 0.5 + u

    with torch.no_grad():
        m(batch(), collect_stats=True)
    cv_before = _load_cv(m.last_load)
    assert m.last_load[0] > 0.45  # nearly every token chose expert 0
    for _ in range(80):
        y, _ = m(batch())
        y.square().mean().backward()
        assert m.gate.e_score_correction_bias.grad is None
        update_moe_biases(m)
    assert m.tokens_per_expert.sum() == 0  # update_bias resets the counts
    with torch.no_grad():
        loads = []
        for _ in range(5):
            m(batch(), collect_stats=True)
            loads.append(m.last_load.clone())
    cv_after = _load_cv(torch.stack(loads).mean(0))
    assert cv_after < 0.4 * cv_before, (cv_before, cv_after)
    assert "e_score_correction_bias" not in dict(m.named_parameters())


def test_bias_changes_selection_not_weights():
    # A constant added to every expert's bias leaves the top-k (and so the output) unchanged; a bias
    # gradient path, or weights taken from biased scores, would change it.
    m = _ours(16)
    _randomise(m)
    x = torch.randn(2, 6, D)
    y0, _ = m(x)
    m.gate.e_score_correction_bias.add_(0.7)
    torch.testing.assert_close(m(x)[0], y0)


def test_counts_only_in_training_and_update_resets():
    m = _ours()
    x = torch.randn(2, 5, D)
    m.eval()
    m(x)
    # Without collect_stats (sampling, evaluation) no statistic is computed at all.
    assert m.last_load.abs().sum() == 0 and m.last_router_entropy == 0
    m(x, collect_stats=True)
    assert m.tokens_per_expert.sum() == 0
    st = m.stats()
    torch.testing.assert_close(st["load"].sum(), torch.tensor(1.0))
    assert 1.0 <= st["load_max_over_mean"] <= E / K
    assert 0.0 < st["router_entropy"] <= torch.log(torch.tensor(float(E))) + 1e-6
    m.train()
    m(x)  # balancing counts do not depend on collect_stats
    m(x)
    assert m.tokens_per_expert.sum() == 2 * 10 * K
    before = m.gate.e_score_correction_bias.clone()
    assert update_moe_biases(torch.nn.Sequential(m, _ours())) == 2
    step = m.gate.e_score_correction_bias - before
    counts = m.last_load * 10 * K  # both forwards saw the same x
    expected = 1e-3 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(step, expected)
    assert m.tokens_per_expert.sum() == 0


def test_aux_loss():
    x = torch.randn(3, 8, D)
    off = _ours()
    _, aux0 = off(x)
    assert aux0.item() == 0.0 and not aux0.requires_grad

    m = _ours(aux_loss_coef=0.1)
    _randomise(m)
    _, aux = m(x)
    # Independent per-sequence reference of DeepSeek-V3's Eqs. 17-20.
    with torch.no_grad():
        ref = 0.0
        for b in range(3):
            s = torch.sigmoid(x[b] @ m.gate.weight.T)  # (L, E)
            idx = (s + m.gate.e_score_correction_bias).topk(K, -1).indices
            f = torch.stack([(idx == e).sum() for e in range(E)]).float() * E / (K * 8)
            P = (s / s.sum(-1, keepdim=True)).mean(0)
            ref += 0.1 * (f * P).sum() / 3
    assert aux.item() > 0
    torch.testing.assert_close(aux, ref.to(aux.dtype))
    aux.backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0


def test_gradients_reach_every_used_part():
    m = _ours(16)
    _randomise(m)
    m.gate.e_score_correction_bias.zero_()
    m.gate.e_score_correction_bias[-1] = -10.0  # expert E-1 never chosen
    x = torch.randn(2, 16, D)
    y, _ = m(x, collect_stats=True)
    y.square().sum().backward()
    used = m.last_load > 0
    assert not used[-1] and used[:-1].sum() >= 4
    for w in (m.experts.up_proj, m.experts.down_proj):
        per_expert = w.grad.abs().flatten(1).sum(1)
        assert (per_expert[used] > 0).all() and (per_expert[~used] == 0).all()
    for p in (
        m.gate.weight, m.fc1_latent_proj.weight, m.fc2_latent_proj.weight,
        m.shared_experts.up_proj.weight, m.shared_experts.down_proj.weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("latent", [None, 16])
def test_bf16_autocast_close_to_fp32(latent):
    m = _ours(latent, aux_loss_coef=0.01)
    _randomise(m, bias_scale=0.0)
    x = torch.randn(2, 12, D)
    y32, _ = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, w, scores = m.gate(x.reshape(-1, D))
        y16, aux = m(x)
        y16.float().square().mean().backward()
    assert w.dtype == scores.dtype == aux.dtype == torch.float32  # the router stays fp32
    err = (y16.float() - y32).norm() / y32.norm()
    assert err < 3e-2, err
    assert m.experts.up_proj.grad.abs().sum() > 0


def test_torch_compile_bf16_fullgraph():
    # The training setting (bf16 autocast) takes the grouped_mm path: one graph, no host sync.
    m = _ours(16, aux_loss_coef=0.01)
    _randomise(m)
    x = torch.randn(2, 6, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = m(x)
        yc, auxc = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(yc.float(), y.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(auxc, aux)
    (yc.float().square().mean() + auxc).backward()
    assert m.experts.up_proj.grad.abs().sum() > 0


@pytest.mark.slow
def test_torch_compile_fp32_matches_eager():
    # fp32 on CPU takes the loop twin under compile (one graph break at counts.tolist()).
    m = _ours(16, aux_loss_coef=0.01)
    _randomise(m)
    x = torch.randn(2, 6, D)
    y, aux = m(x)
    yc, auxc = torch.compile(m, backend="aot_eager")(x)
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(auxc, aux)
    (yc.square().mean() + auxc).backward()
    assert m.experts.up_proj.grad.abs().sum() > 0


def test_config_errors():
    with pytest.raises(ConfigError, match="top_k"):
        MoE(D, num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="n_group"):
        MoE(D, num_experts=8, top_k=2, n_group=3)
    with pytest.raises(ConfigError, match="topk_group"):
        MoE(D, num_experts=8, top_k=2, n_group=4, topk_group=5)
    with pytest.raises(ConfigError, match="latent_size"):
        MoE(D, latent_size=0)


def _dist_worker(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    m = _ours()  # same weights on both ranks
    torch.manual_seed(100 + rank)  # different data per rank
    m(torch.randn(2, 8, D))
    local = m.tokens_per_expert.clone()
    m.update_bias()
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    biases = [torch.zeros(E) for _ in range(world)]
    dist.all_gather(biases, m.gate.e_score_correction_bias)
    if rank == 0:
        torch.save({"counts": gathered, "biases": biases}, result_file)
    dist.destroy_process_group()


def test_update_bias_uses_reduced_counts(monkeypatch):
    # In-process stand-in for a second rank: all_reduce adds that rank's counts. The update must
    # follow the summed counts, not the local ones.
    m = _ours()
    m.train()
    m(torch.randn(2, 8, D))
    local = m.tokens_per_expert.clone()
    remote = torch.zeros(E, dtype=torch.long)
    remote[int(local.argmin())] = 1000  # flips the least-loaded local expert to the most loaded
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: t.add_(remote))
    m.update_bias()
    total = (local + remote).double()
    torch.testing.assert_close(m.gate.e_score_correction_bias, 1e-3 * torch.sign(total.mean() - total).float())
    assert m.gate.e_score_correction_bias[int(local.argmin())] < 0


@pytest.mark.slow
def test_update_bias_all_reduces_counts():
    with tempfile.TemporaryDirectory() as d:
        result = os.path.join(d, "result.pt")
        mp.spawn(_dist_worker, args=(2, os.path.join(d, "init"), result), nprocs=2)
        out = torch.load(result)
    assert not torch.equal(out["counts"][0], out["counts"][1])  # the ranks really saw different data
    total = (out["counts"][0] + out["counts"][1]).double()
    expected = 1e-3 * torch.sign(total.mean() - total).float()
    torch.testing.assert_close(out["biases"][0], expected)
    torch.testing.assert_close(out["biases"][1], expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grouped_path_matches_loop():
    m = MoE(64, E, K, intermediate_size=128, shared_intermediate_size=64, latent_size=32).cuda()
    x = torch.randn(2, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        idx, _, _ = m.gate(x.reshape(-1, 64))
        counts = torch.bincount(idx.flatten(), minlength=E)
        h = torch.randn(int(counts.sum()), 32, device="cuda")
        grouped = m.experts(h, counts)
        loop = m.experts.forward_loop(h.bfloat16(), counts)
    torch.testing.assert_close(grouped.float(), loop.float(), rtol=2e-2, atol=2e-2)
