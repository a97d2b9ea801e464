"""One-GPU benchmark (issue 10): training throughput of the presets, and the hybrid's speed against
attention-only and DiT at long sequences. JSON to stdout (and ``--out``).

    python benchmarks/gpu_check.py --out gpu_check.json       # on a CUDA device (scripts/gpu_check.sh)
    python benchmarks/gpu_check.py --smoke --device cpu       # tiny sizes: proves the script end to end

Sections:
  training: one optimiser step (forward, backward, AdamW) of the ``S`` and ``B`` presets'
            backbone with a linear patch head and an MSE loss, bf16 autocast on CUDA, on 3x64x64
            pixels and 4x32x32 latents (patch 2: 1024 and 256 tokens): images/s, achieved TFLOP/s
            (matmul FLOPs counted by ``torch.utils.flop_counter`` on one step, attention cores by
            hand when the counter misses them) and that as a fraction of ``--peak-tflops`` (989 =
            an H200's dense bf16 peak).
  ratios:   forward+backward time of the hybrid (the ``S`` preset's pattern and width) against the
            same stack with every ``M`` replaced by ``*`` and diffusers' ``DiTTransformer2DModel``
            with the closest parameter count, at 1024, 4096 and 16384 tokens (4-channel latents at
            patch 2), the candidates taking turns within each repeat.

``--smoke`` shrinks every size (width 64, a 7-sublayer pattern, 16/64 tokens, one repeat) so
that a CPU runs it in seconds; its figures say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_backbone import _baddbmm_flops, backbone_kwargs, grid_for, n_params, sdpa_flops  # noqa: E402

from unidiff.models.backbone import HybridBackbone  # noqa: E402
from unidiff.models.presets import get_preset  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0

# The training spaces: (name, channels, side). Patch 2 -> (side/2)^2 tokens.
SPACES = (("pixels_64", 3, 64), ("latents_32", 4, 32))
SMOKE_SPACES = (("pixels_8", 3, 8), ("latents_4", 4, 4))
SMOKE_PRESET = dict(hidden_size=64, pattern="MEMEM*E", num_heads=2, num_kv_heads=1, d_state=8, headdim=16,
                    chunk_size=16, num_experts=4, top_k=2, num_registers=1, patch_size=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class PatchRegressor(nn.Module):
    """The backbone with a linear patch head (what an image head does, minus its options): the
    unit whose training step is timed."""

    def __init__(self, backbone: HybridBackbone, channels: int):
        super().__init__()
        self.backbone = backbone
        p = backbone.patch_size
        self.head = nn.Linear(backbone.hidden_size, p * p * channels)

    def forward(self, z, t):
        tokens = self.backbone(z, t).tokens  # (B, L, D)
        B, C, H, W = z.shape
        p = self.backbone.patch_size
        patches = self.head(tokens)  # (B, L, p p C)
        return patches.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def count_flops(fn, n_attn: int, batch: int, tokens: int, width: int) -> int:
    """FLOPs of ``fn()`` (forward+backward) by ``torch.utils.flop_counter``, plus the attention cores
    by hand when the counter saw no attention kernel (it counts CUDA flash/efficient SDPA, not the
    CPU one)."""
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: _baddbmm_flops})
    with counter:
        fn()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    flops = counter.get_total_flops()
    if not any("attention" in op and n > 0 for op, n in by_op.items()):
        flops += sdpa_flops(n_attn, batch, tokens, width)
    return flops


def median_times(fns, repeats: int, warmup: int, device: torch.device):
    """Median seconds of each ``fn()`` in ``fns`` (name -> fn), taking turns within every repeat."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_training(presets, spaces, batch, repeats, warmup, device, dtype, peak_tflops, overrides=None):
    rows = []
    for preset in presets:
        for space, C, side in spaces:
            torch.manual_seed(0)
            opts = dict(get_preset(preset), **(overrides or {}))
            model = PatchRegressor(HybridBackbone(in_channels=C, input_size=(side, side), **opts), C).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            z = torch.randn(batch, C, side, side, device=device)
            target = torch.randn_like(z)
            t = torch.randint(0, 1000, (batch,), device=device)

            def loss_backward():
                with _autocast(device, dtype):
                    loss = F.mse_loss(model(z, t).float(), target)
                loss.backward()

            def step():
                opt.zero_grad(set_to_none=True)
                loss_backward()
                opt.step()

            tokens = (side // opts["patch_size"]) ** 2
            flops = count_flops(loss_backward, opts["pattern"].count("*"), batch, tokens, opts["hidden_size"])
            sec = median_times({"step": step}, repeats, warmup, device)["step"]
            tflops = flops / sec / 1e12
            row = {"preset": preset, "space": space, "image_shape": [C, side, side], "tokens": tokens, "batch": batch,
                   "params": n_params(model), "step_sec": sec, "images_per_sec": batch / sec,
                   "flops_per_step": flops, "tflops_per_sec": tflops, "fraction_of_peak": tflops / peak_tflops}
            rows.append(row)
            print(json.dumps({"training": row}), flush=True)
            del model, opt
    return rows


def _dit_matching(width: int, side: int, target: int, max_depth: int):
    """diffusers' DiT at ``width`` with the depth whose parameter count is closest to ``target``."""
    from diffusers import DiTTransformer2DModel

    def build(depth):
        return DiTTransformer2DModel(num_attention_heads=max(1, width // 64), attention_head_dim=min(64, width),
                                     in_channels=4, num_layers=depth, sample_size=side, patch_size=2,
                                     num_embeds_ada_norm=1000)

    best = None
    for depth in range(1, max_depth + 1):
        with torch.device("meta"):
            gap = abs(n_params(build(depth)) - target)
        if best is None or gap < best[1]:
            best = (depth, gap)
    return build(best[0]), best[0]


def bench_ratios(tokens_list, width, pattern, batch, repeats, warmup, device, dtype):
    rows = []
    attn_pattern = pattern.replace("M", "*")
    for L in tokens_list:
        H, W = grid_for(L)
        common = dict(backbone_kwargs(L, width), pattern=pattern)
        torch.manual_seed(0)
        hybrid = HybridBackbone(**common).to(device)
        attn = HybridBackbone(**dict(common, pattern=attn_pattern)).to(device)
        dit, depth = _dit_matching(width, H, n_params(hybrid), 4 * len(pattern))
        dit = dit.to(device)
        z = torch.randn(batch, 4, H, W, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        y = torch.zeros(batch, dtype=torch.long, device=device)

        def fwd_bwd(model, fn):
            def run():
                model.zero_grad(set_to_none=True)
                with _autocast(device, dtype):
                    loss = fn().float().pow(2).mean()
                loss.backward()
            return run

        fns = {
            "hybrid": fwd_bwd(hybrid, lambda: hybrid(z, t).tokens),
            "attention_only": fwd_bwd(attn, lambda: attn(z, t).tokens),
            "dit": fwd_bwd(dit, lambda: dit(z, timestep=t, class_labels=y).sample),
        }
        secs = median_times(fns, repeats, warmup, device)
        row = {"tokens": L, "batch": batch, "width": width, "pattern": pattern, "sec": secs,
               "params": {"hybrid": n_params(hybrid), "attention_only": n_params(attn), "dit": n_params(dit)},
               "dit_depth": depth,
               "speedup_vs_attention_only": secs["attention_only"] / secs["hybrid"],
               "speedup_vs_dit": secs["dit"] / secs["hybrid"]}
        rows.append(row)
        print(json.dumps({"ratios": row}), flush=True)
        del hybrid, attn, dit
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds on a CPU); figures meaningless")
    ap.add_argument("--sections", nargs="+", choices=["training", "ratios"], default=["training", "ratios"])
    ap.add_argument("--presets", nargs="+", default=["S", "B"])
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 64; smoke 2)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="ratio section (default 1024 4096 16384)")
    ap.add_argument("--ratio-batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10; smoke 1)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="autocast dtype (default bf16 on CUDA, else fp32)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu with --smoke)")
    smoke = args.smoke
    batch = args.batch or (2 if smoke else 64)
    repeats = args.repeats or (1 if smoke else 10)
    warmup = 1 if smoke else 3
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    tokens = args.tokens or ([16, 64] if smoke else [1024, 4096, 16384])
    for n in tokens:
        if n < 1 or round(n**0.5) ** 2 != n:
            ap.error(f"--tokens {n}: every token count must be a square (a square grid of patches)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    result = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(device),
                          "device_name": name, "threads": torch.get_num_threads()},
              "args": vars(args), "smoke": smoke, "dtype": dtype, "peak_tflops": args.peak_tflops}
    if "training" in args.sections:
        result["training"] = bench_training(args.presets, SMOKE_SPACES if smoke else SPACES, batch, repeats, warmup,
                                            device, dtype, args.peak_tflops, overrides=SMOKE_PRESET if smoke else None)
    if "ratios" in args.sections:
        width, pattern = (64, "MEMEM*E") if smoke else (get_preset("S")["hidden_size"], get_preset("S")["pattern"])
        result["ratios"] = bench_ratios(tokens, width, pattern, args.ratio_batch, repeats, warmup, device, dtype)
    for row in result.get("training", []):
        assert math.isfinite(row["tflops_per_sec"])
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from unidiff.io import write_text

        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
