"""Backbone speed benchmark (issue 2): forward+backward time per step, side by side, in one run.

    python benchmarks/bench_backbone.py                 # all sections, JSON to stdout
    python benchmarks/bench_backbone.py --tokens 64 256 --dtype fp32 --out bench.json

Sections, each at 64, 256, 1024 and 4096 tokens (patch-2 latents of 16², 32², 64², 128²):
  backbone: the hybrid stack vs an attention-only stack of the same width and depth (every ``M``
            replaced by ``*``) vs diffusers' ``DiTTransformer2DModel`` with a matched parameter count;
  sublayers: one sublayer of each kind, and the speedup over attention-only they predict for the
            pattern, with its ceiling (the speedup if the Mamba sublayers cost nothing);
  mixer:    our chunked-SSD Mamba-2 mixer vs transformers' ``NemotronHMamba2Mixer`` (torch path) with
            the same weights (outputs compared, max abs difference reported);
  moe:      MoE (8 experts, top-2, + shared expert) vs a dense FFN with the same active parameters;
  peak:     the machine's own fp32 and bf16 matmul FLOP/s, measured in this run, against which the
            achieved matmul FLOP/s of each backbone step (counted by ``torch.utils.flop_counter``)
            is reported.

Timings are medians over ``--repeats`` after a warm-up, the candidates of a comparison taking turns
within each repeat. Only ratios measured in the same run are meaningful (these machines are noisy);
BENCHMARKS.md records the latest figures and this command.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, bmm_flop

from unidiff.models.backbone import LAYER_KINDS, HybridBackbone
from unidiff.models.mamba2 import Mamba2Mixer
from unidiff.models.moe import MoE, DenseMLP


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def time_side_by_side(fns, repeats: int, dtype: str, warmup: int = 1):
    """Median seconds of one forward+backward of each ``fn()`` (a scalar loss), for ``fns`` a dict
    name -> (parameters, fn). The candidates take turns within every repeat, so a slow spell of a
    shared machine lands on all of them rather than on whichever ran during it."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, (params, fn) in fns.items():
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            with autocast(dtype):
                loss = fn()
            loss.backward()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_modules(row, modules, x, repeats: int, dtype: str):
    """Time ``name -> module`` side by side on input x (loss: mean square of the first output) and
    record ``row[f"{name}_sec"]``."""
    def loss_of(m):
        return lambda: (m(x)[0] if isinstance(m, MoE) else m(x)).float().pow(2).mean()

    secs = time_side_by_side({k: (list(m.parameters()), loss_of(m)) for k, m in modules.items()}, repeats, dtype)
    row.update({f"{k}_sec": s for k, s in secs.items()})


def sdpa_flops(n_layers: int, batch: int, tokens: int, width: int) -> int:
    """Forward+backward FLOPs of ``n_layers`` attention cores (QKᵀ and AV: 4·B·L²·D forward, twice
    that backward). Added by hand: ``torch.utils.flop_counter`` does not count the CPU flash-SDPA
    kernel (it reports 0 for it)."""
    return 3 * 4 * batch * tokens * tokens * width * n_layers


def _baddbmm_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    """FLOPs of ``self.baddbmm_(a, b)``: those of ``a @ b`` (the counter's own rule for baddbmm)."""
    return bmm_flop(a_shape, b_shape)


def matmul_flops(fn, dtype: str, by_op: bool = False):
    """Matmul FLOPs of one forward+backward counted by ``torch.utils.flop_counter`` (mm/bmm/conv;
    see :func:`sdpa_flops` for attention): the total, or with ``by_op`` a dict op name -> FLOPs."""
    # The counter knows baddbmm but not its in-place form, which the SSD uses to accumulate.
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: _baddbmm_flops})
    with counter:
        with autocast(dtype):
            loss = fn()
        loss.backward()
    if not by_op:
        return counter.get_total_flops()
    return {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}


def peak_matmul(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """Achieved FLOP/s of a large square matmul: the machine's practical peak for ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def grid_for(tokens: int, patch: int = 2):
    side = int(round(tokens**0.5)) * patch
    return side, side


def backbone_kwargs(tokens: int, width: int):
    """The HybridBackbone settings every backbone row uses (4-channel latents at patch 2)."""
    return dict(in_channels=4, input_size=grid_for(tokens), patch_size=2, hidden_size=width, num_heads=width // 64,
                num_kv_heads=max(1, width // 128), d_state=64, headdim=64, chunk_size=64, num_experts=8, top_k=2)


def bench_sublayers(tokens_list, width, pattern, dtype, repeats, batch, peak=None, compile=()):
    """One sublayer of each kind (adaLN, norm and residual included), forward+backward on the same
    input, side by side. From them: the pattern's speedup over attention-only as the sublayer times
    predict it, and two bounds on what a faster Mamba mixer could reach: the speedup if every ``M``
    sublayer cost nothing, and (given the measured matmul ``peak``) if it cost only its matmul FLOPs
    at that peak, with no other work at all. ``compile``: the kinds to also time under
    ``torch.compile`` (inductor, compiled during the warm-up; graph breaks allowed, so that older
    code runs too), taking turns with the eager ones, and report ``compiled_over_eager`` per kind."""
    rows = []
    kinds = sorted(set(pattern) | {"*"})
    for L in tokens_list:
        torch.manual_seed(0)
        model = HybridBackbone(pattern="".join(kinds), **backbone_kwargs(L, width))
        x = torch.randn(batch, L, width, requires_grad=True)
        c = torch.randn(batch, width)
        def loss_of(layer):
            return lambda: layer(x, c)[0].float().pow(2).mean()

        fns, timed = {}, {}  # by kind name: (parameters, loss); timed adds the compiled twins
        for layer in model.layers:
            params = list(layer.parameters()) + [x]
            fns[LAYER_KINDS[layer.kind]] = (params, loss_of(layer))
            if LAYER_KINDS[layer.kind] in compile:
                timed[LAYER_KINDS[layer.kind] + "_compiled"] = (params, loss_of(torch.compile(layer)))
        secs = time_side_by_side({**fns, **timed}, repeats, dtype)
        compiled = {k[: -len("_compiled")]: secs.pop(k) for k in list(secs) if k.endswith("_compiled")}
        count = {LAYER_KINDS[k]: pattern.count(k) for k in kinds}
        hybrid = sum(count[k] * s for k, s in secs.items())
        attention_only = hybrid + count["mamba"] * (secs["attention"] - secs["mamba"])
        row = {"tokens": L, "batch": batch, "pattern": pattern, "sec": secs,
               "predicted_speedup_vs_attention_only": attention_only / hybrid,
               "ceiling_speedup_if_mamba_free": attention_only / (hybrid - count["mamba"] * secs["mamba"])}
        if compile:
            # Eager and compiled take turns in the same repeats; > 1 means compiled is slower.
            row["compiled_sec"] = compiled
            row["compiled_over_eager"] = {k: compiled[k] / secs[k] for k in compiled}
        if peak and "mamba" in fns:
            floor = matmul_flops(fns["mamba"][1], dtype) / peak
            row["mamba_matmul_floor_sec"] = floor
            row["speedup_if_mamba_at_matmul_floor"] = attention_only / (hybrid - count["mamba"] * (secs["mamba"] - floor))
        rows.append(row)
        print(json.dumps({"sublayers": row}), flush=True)
    return rows


def bench_backbones(tokens_list, width, pattern, dtype, repeats, batch):
    rows = []
    attn_pattern = pattern.replace("M", "*")
    for L in tokens_list:
        H, W = grid_for(L)
        common = backbone_kwargs(L, width)
        torch.manual_seed(0)
        hybrid = HybridBackbone(pattern=pattern, **common)
        attn = HybridBackbone(pattern=attn_pattern, **common)
        # DiT with the hybrid's width; depth chosen so its parameter count is closest to the hybrid's.
        from diffusers import DiTTransformer2DModel

        target = n_params(hybrid)
        best = None
        for depth in range(1, 4 * len(pattern)):
            with torch.device("meta"):
                dit = DiTTransformer2DModel(num_attention_heads=width // 64, attention_head_dim=64, in_channels=4,
                                            num_layers=depth, sample_size=H, patch_size=2, num_embeds_ada_norm=1000)
            gap = abs(n_params(dit) - target)
            if best is None or gap < best[1]:
                best = (depth, gap)
        dit = DiTTransformer2DModel(num_attention_heads=width // 64, attention_head_dim=64, in_channels=4,
                                    num_layers=best[0], sample_size=H, patch_size=2, num_embeds_ada_norm=1000)
        z = torch.randn(batch, 4, H, W)
        t = torch.randint(0, 1000, (batch,))
        y = torch.zeros(batch, dtype=torch.long)
        fns = {
            "hybrid": (hybrid, lambda: hybrid(z, t).tokens.float().pow(2).mean()),
            "attention_only": (attn, lambda: attn(z, t).tokens.float().pow(2).mean()),
            "dit": (dit, lambda: dit(z, timestep=t, class_labels=y).sample.float().pow(2).mean()),
        }
        row = {"tokens": L, "batch": batch}
        n_attn = {"hybrid": pattern.count("*"), "attention_only": attn_pattern.count("*"), "dit": best[0]}
        secs = time_side_by_side({k: (list(m.parameters()), fn) for k, (m, fn) in fns.items()}, repeats, dtype)
        for name, (model, fn) in fns.items():
            sec = secs[name]
            flops = matmul_flops(fn, dtype) + sdpa_flops(n_attn[name], batch, L, width)
            row[name] = {"params": n_params(model), "sec": sec, "matmul_flops": flops, "flops_per_sec": flops / sec}
        row["dit"]["depth"] = best[0]
        row["speedup_vs_attention_only"] = row["attention_only"]["sec"] / row["hybrid"]["sec"]
        row["speedup_vs_dit"] = row["dit"]["sec"] / row["hybrid"]["sec"]
        rows.append(row)
        print(json.dumps({"backbone": row}), flush=True)
    return rows


def bench_mixer(tokens_list, width, dtype, repeats, batch):
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    heads, headdim, d_state = 2 * width // 64, 64, 64
    cfg = NemotronHConfig(hidden_size=width, mamba_num_heads=heads, mamba_head_dim=headdim, ssm_state_size=d_state,
                          n_groups=1, chunk_size=64, conv_kernel=4, num_hidden_layers=1, layers_block_type=["mamba"],
                          vocab_size=16)
    rows = []
    for L in tokens_list:
        torch.manual_seed(0)
        # Both with the Mamba-2 initialisation (dt log-uniform in [1e-3, 0.1], A in [1, 16]), which
        # is what transformers' own _init_weights gives a NemotronH model; the bare module keeps
        # placeholder values (dt_bias = 1) that no model is built with. Ours takes Nemotron-H's dt
        # clamp and eps so the two compute the same function.
        ours = Mamba2Mixer(width, d_state=d_state, headdim=headdim, n_groups=1, chunk_size=64, expand=2,
                           dt_limit=(cfg.time_step_min, float("inf")), norm_eps=cfg.layer_norm_epsilon)
        ref = NemotronHMamba2Mixer(cfg, layer_idx=0)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(batch, L, width)
        with torch.no_grad():
            diff = (ours(x) - ref(x)).abs().max().item()
        row = {"tokens": L, "batch": batch, "max_abs_diff_fp32": diff}
        # Ours, by kind: the projections are mm (the same matmuls in both), the SSD's products bmm.
        row["ours_matmul_flops"] = matmul_flops(lambda: ours(x).float().pow(2).mean(), dtype, by_op=True)
        time_modules(row, {"ours": ours, "transformers": ref}, x, repeats, dtype)
        row["speedup"] = row["transformers_sec"] / row["ours_sec"]
        rows.append(row)
        print(json.dumps({"mixer": row}), flush=True)
    return rows


def bench_moe(tokens_list, width, dtype, repeats, batch):
    rows = []
    F = 2 * width  # each expert's width; active = shared + top-2 routed = 3F
    for L in tokens_list:
        torch.manual_seed(0)
        moe = MoE(width, num_experts=8, top_k=2, intermediate_size=F, shared_intermediate_size=F)
        dense = DenseMLP(width, 3 * F)
        x = torch.randn(batch, L, width)
        row = {"tokens": L, "batch": batch, "moe_params": n_params(moe), "dense_params": n_params(dense)}
        time_modules(row, {"moe": moe, "dense": dense}, x, repeats, dtype)
        row["moe_over_dense"] = row["moe_sec"] / row["dense_sec"]
        rows.append(row)
        print(json.dumps({"moe": row}), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--sections", nargs="+", default=["peak", "backbone", "sublayers", "mixer", "moe"])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--pattern", default="MEMEM*E")
    # fp32 by default: this project's CPU machines have no AMX, and bf16 is slower there (emulated
    # without AVX512-BF16; on one with it, autocast's casts cost more than they save at these widths).
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype of the timed steps")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", nargs="*", choices=["mamba", "attention", "moe"], default=None,
                    help="sublayers section: also time these kinds compiled (none named: all three), "
                         "and their compiled/eager ratio")
    ap.add_argument("--peak-size", type=int, default=1024, help="matrix size of the peak matmul measurement")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    for t in args.tokens:
        if t < 1 or round(t**0.5) ** 2 != t:
            ap.error(f"--tokens {t}: every token count must be a square (a square grid of patches), e.g. 4096 = 64²")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
              "args": vars(args)}
    if "peak" in args.sections:
        n = args.peak_size
        result["peak_flops_per_sec"] = {"fp32": peak_matmul(torch.float32, n), "bf16": peak_matmul(torch.bfloat16, n)}
        print(json.dumps({"peak": result["peak_flops_per_sec"]}), flush=True)
    if "backbone" in args.sections:
        result["backbone"] = bench_backbones(args.tokens, args.width, args.pattern, args.dtype, args.repeats, args.batch)
        if "peak_flops_per_sec" in result:
            peak = result["peak_flops_per_sec"]["bf16" if args.dtype == "bf16" else "fp32"]
            for row in result["backbone"]:
                for name in ("hybrid", "attention_only", "dit"):
                    row[name]["fraction_of_peak"] = row[name]["flops_per_sec"] / peak
    if "sublayers" in args.sections:
        peak = result.get("peak_flops_per_sec", {}).get("bf16" if args.dtype == "bf16" else "fp32")
        result["sublayers"] = bench_sublayers(args.tokens, args.width, args.pattern, args.dtype, args.repeats, args.batch,
                                              peak, compile=() if args.compile is None else
                                              (args.compile or ("mamba", "attention", "moe")))
    if "mixer" in args.sections:
        result["mixer"] = bench_mixer(args.tokens, args.width, args.dtype, args.repeats, args.batch)
    if "moe" in args.sections:
        result["moe"] = bench_moe(args.tokens, args.width, args.dtype, args.repeats, args.batch)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
