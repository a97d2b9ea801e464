"""CUDA checks (issue 10), opt-in with ``-m gpu`` (``scripts/gpu_check.sh`` runs them): bf16 autocast
against a CPU fp32 reference, the SDPA kernels against the math one, the optional Mamba kernels
against the readable reference, the grouped expert GEMM against the per-expert loop, and the SSD
without a host synchronisation. Each skips with its reason when CUDA (or the optional package) is
missing.

The last test is not a GPU test: it runs ``benchmarks/gpu_check.py --smoke`` on the CPU, so the
script the GPU check runs is known to work end to end before a GPU is lent.
"""

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from unidiff.models import moe as moe_mod
from unidiff.models.attention import Attention
from unidiff.models.backbone import HybridBackbone
from unidiff.models.mamba2 import Mamba2Mixer, causal_depthwise_conv
from unidiff.models.ssd import ssd_chunked, ssd_naive

from ssd_fixtures import ssd_inputs

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")


def rel(a, b):
    """Norm-wise relative error ||a - b|| / ||b|| in fp32 (robust to a few rounding outliers)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@gpu
@needs_cuda
def test_bf16_autocast_forward_backward_close_to_cpu_fp32():
    # The whole backbone (every sublayer kind, the CUDA kernels when installed) under bf16 autocast
    # against the same weights in fp32 on the CPU. Tolerance: 3e-2 norm-wise on the output and 5e-2
    # on each gradient (bf16 keeps 8 bits of mantissa, ~4e-3 per rounding; a dozen sublayers add up).
    # Every token uses every expert (top_k = num_experts): a discrete top-k choice flipped by bf16
    # rounding would be a difference of routing, not of arithmetic.
    torch.manual_seed(0)
    opts = dict(hidden_size=64, pattern="M*E-M", num_heads=4, num_kv_heads=2, d_state=16, headdim=16, chunk_size=16,
                num_experts=4, top_k=4, num_registers=1, patch_size=2)
    cpu = HybridBackbone(in_channels=4, input_size=(16, 16), **opts)
    with torch.no_grad():
        for layer in cpu.layers:
            layer.adaLN[-1].weight.normal_(std=0.1)
    cuda = HybridBackbone(in_channels=4, input_size=(16, 16), **opts)
    cuda.load_state_dict(cpu.state_dict())
    cuda.cuda()
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 700])

    out_ref = cpu(z, t).tokens
    out_ref.square().mean().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = cuda(z.cuda(), t.cuda()).tokens
    out.float().square().mean().backward()
    assert rel(out, out_ref) < 3e-2
    for (name, p_ref), p in zip(cpu.named_parameters(), cuda.parameters()):
        if p_ref.grad is not None and p_ref.grad.norm() > 1e-6:
            assert rel(p.grad, p_ref.grad) < 5e-2, name


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_sdpa_fused_kernels_match_the_math_kernel(backend, kv_heads):
    # Our attention module forced onto one fused kernel in bf16, against the math kernel in fp32 on
    # the same weights: outputs and gradients within 2e-2 norm-wise (bf16 rounding).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    attn = Attention(256, 4, kv_heads).cuda()
    x = torch.randn(2, 300, 256, device="cuda")

    def run(kernel, dtype):
        attn.zero_grad()
        xi = x.clone().requires_grad_()
        with sdpa_kernel([kernel]), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = attn(xi)
        y.float().square().mean().backward()
        return [y, xi.grad] + [p.grad.clone() for p in attn.parameters()]

    ref = run(SDPBackend.MATH, torch.float32)
    got = run(getattr(SDPBackend, backend), torch.bfloat16)
    for a, b in zip(got, ref):
        assert rel(a, b) < 2e-2


@gpu
@needs_cuda
def test_causal_conv1d_kernel_matches_the_readable_conv():
    causal_conv1d = pytest.importorskip("causal_conv1d", reason="causal_conv1d is not installed")
    torch.manual_seed(0)
    x = torch.randn(2, 70, 48, device="cuda", requires_grad=True)
    w = torch.randn(48, 4, device="cuda", requires_grad=True)
    b = torch.randn(48, device="cuda", requires_grad=True)
    g = torch.randn(2, 70, 48, device="cuda")

    def grads(fn):
        for t in (x, w, b):
            t.grad = None
        y = fn()
        (y * g).sum().backward()
        return [y, x.grad, w.grad, b.grad]

    ref = grads(lambda: causal_depthwise_conv(x, w, b, activation="silu"))
    got = grads(lambda: causal_conv1d.causal_conv1d_fn(x.transpose(1, 2).contiguous(), w, b,
                                                        activation="silu").transpose(1, 2))
    for a, r in zip(got, ref):
        assert rel(a, r) < 1e-4


@gpu
@needs_cuda
def test_mamba_ssm_scan_matches_the_recurrence():
    pytest.importorskip("mamba_ssm", reason="mamba_ssm is not installed")
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    inputs = ssd_inputs(2, 70, 4, 16, 2, 16, device="cuda")[:6]

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        (y * torch.ones_like(y).normal_(generator=torch.Generator("cuda").manual_seed(1))).sum().backward()
        return [y] + [t.grad for t in leaves]

    ref = grads(lambda x, dt, A, B, C, D: ssd_naive(x, dt, A, B, C, D=D)[0])
    got = grads(lambda x, dt, A, B, C, D: mamba_chunk_scan_combined(x, dt, A, B, C, 16, D=D))
    for a, r in zip(got, ref):
        assert rel(a, r) < 1e-3


@gpu
@needs_cuda
def test_grouped_expert_matmul_matches_the_per_expert_loop():
    experts = moe_mod.GroupedExperts(8, 64, 128).cuda()
    counts = torch.tensor([5, 0, 17, 3, 9, 0, 1, 29], device="cuda")  # idle experts: empty groups
    x = torch.randn(int(counts.sum()), 64, device="cuda")
    if not moe_mod._can_use_grouped_mm(x.bfloat16(), 64, 128):
        pytest.skip(f"grouped_mm does not run here ({torch.cuda.get_device_name()}: needs bf16 on sm90+)")
    g = torch.randn_like(x)

    def grads(fn, dtype):
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = fn(xi)
        (y.float() * g).sum().backward()
        return [y, xi.grad, experts.up_proj.grad.clone(), experts.down_proj.grad.clone()]

    ref = grads(lambda xi: experts.forward_loop(xi, counts), torch.float32)  # readable twin, fp32
    got = grads(lambda xi: experts(xi, counts), torch.bfloat16)  # grouped GEMM, bf16
    for a, r in zip(got, ref):
        assert rel(a, r) < 2e-2


@gpu
@needs_cuda
def test_ssd_and_mixer_run_without_a_host_sync():
    # set_sync_debug_mode("error") raises on any operation that waits for the device (.item(),
    # bool(tensor), nonzero, ...). Values are still checked against the recurrence afterwards.
    x, dt, A, B, C, D = (t.requires_grad_() for t in ssd_inputs(2, 100, 4, 16, 2, 16, device="cuda")[:6])
    mixer = Mamba2Mixer(64, d_state=16, headdim=16, chunk_size=16, use_fast_path=False).cuda()
    u = torch.randn(2, 50, 64, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, s = ssd_chunked(x, dt, A, B, C, 32, D=D)
        (y.square().sum() + s.sum()).backward()
        mixer(u).square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, D=D)
    assert rel(y, y_ref) < 1e-4 and rel(s, s_ref) < 1e-4
    assert torch.isfinite(u.grad).all()


def _gpu_check_module():
    """benchmarks/gpu_check.py imported in this process (its imports are this test's: no second
    interpreter start-up, which costs more than the whole smoke run on a loaded CPU)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_runs_end_to_end_on_cpu(tmp_path, capsys):
    # Not a GPU test: the benchmark the GPU check runs, at its --smoke sizes, on the CPU.
    gpu_check = _gpu_check_module()
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--smoke", "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("\n{\n") + 1:]) == res  # stdout ends with the same JSON
    assert res["smoke"] and res["peak_tflops"] == 989.0
    assert {(r["preset"], r["space"]) for r in res["training"]} == {(p, s) for p in ("S", "B")
                                                                     for s in ("pixels_8", "latents_4")}
    for r in res["training"]:
        assert r["step_sec"] > 0 and r["flops_per_step"] > 0
        assert math.isclose(r["images_per_sec"], r["batch"] / r["step_sec"])
        assert math.isclose(r["fraction_of_peak"], r["flops_per_step"] / r["step_sec"] / 1e12 / 989.0)
    assert [r["tokens"] for r in res["ratios"]] == [16, 64]
    for r in res["ratios"]:
        secs = r["sec"]
        assert math.isclose(r["speedup_vs_attention_only"], secs["attention_only"] / secs["hybrid"])
        assert math.isclose(r["speedup_vs_dit"], secs["dit"] / secs["hybrid"])
    with pytest.raises(SystemExit) as bad:
        gpu_check.main(["--tokens", "8", "--device", "cpu"])
    assert bad.value.code == 2 and "--tokens 8" in capsys.readouterr().err


def test_gpu_check_shell_script_parses():
    script = ROOT / "scripts/gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "-m gpu" in text and "benchmarks/gpu_check.py" in text
