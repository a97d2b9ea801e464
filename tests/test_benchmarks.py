"""The benchmark scripts run end to end at toy sizes and print the JSON BENCHMARKS.md is built from.

Speed targets are not asserted here (CI machines are noisy); only that every figure is produced,
finite, and internally consistent (ratios equal the quotients of the times they come from).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_backbone_benchmark_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_backbone.py"), "--tokens", "16", "--width", "64",
           "--repeats", "1", "--peak-size", "64", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["peak_flops_per_sec"]["fp32"] > 0 and res["peak_flops_per_sec"]["bf16"] > 0
    (bb,) = res["backbone"]
    assert bb["tokens"] == 16
    assert math.isclose(bb["speedup_vs_attention_only"], bb["attention_only"]["sec"] / bb["hybrid"]["sec"])
    for name in ("hybrid", "attention_only", "dit"):
        assert bb[name]["sec"] > 0 and bb[name]["matmul_flops"] > 0 and 0 < bb[name]["fraction_of_peak"]
    (sub,) = res["sublayers"]
    secs = sub["sec"]
    assert set(secs) == {"mamba", "attention", "moe"} and all(s > 0 for s in secs.values())
    # "MEMEM*E": 3 mamba, 1 attention, 3 moe; attention-only swaps each mamba for an attention.
    hybrid = 3 * secs["mamba"] + secs["attention"] + 3 * secs["moe"]
    attention_only = 4 * secs["attention"] + 3 * secs["moe"]
    assert math.isclose(sub["predicted_speedup_vs_attention_only"], attention_only / hybrid)
    assert math.isclose(sub["ceiling_speedup_if_mamba_free"], attention_only / (secs["attention"] + 3 * secs["moe"]))
    floor = sub["mamba_matmul_floor_sec"]
    assert 0 < floor and sub["speedup_if_mamba_at_matmul_floor"] <= sub["ceiling_speedup_if_mamba_free"]
    assert math.isclose(sub["speedup_if_mamba_at_matmul_floor"], attention_only / (hybrid - 3 * (secs["mamba"] - floor)))
    (mx,) = res["mixer"]
    flops = mx["ours_matmul_flops"]
    assert flops["mm"] > 0 and flops["bmm"] > 0  # the projections, and the SSD's batched products
    assert mx["max_abs_diff_fp32"] < 1e-4  # same weights, same outputs as transformers' torch path
    (moe,) = res["moe"]
    assert math.isclose(moe["moe_over_dense"], moe["moe_sec"] / moe["dense_sec"])


def test_backbone_benchmark_rejects_a_token_count_that_is_not_a_square():
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_backbone.py"), "--tokens", "8192", "--sections", "peak"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--tokens 8192" in proc.stderr and "square" in proc.stderr
