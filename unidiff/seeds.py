"""Multi-seed runs: ``unidiff run|experiment CONFIG --seeds 0,1,2``, summarised as mean ± std.

Seed ``s`` of a run named ``<name>`` is the ordinary run ``run.name=<name>_s<s>`` with
``run.seed=s`` (its own folder, resumable like any other); an experiment's seed ``s`` is the
experiment ``experiment.name=<name>_s<s>`` with ``run.seed=s`` for every arm. The per-seed
metrics go through :func:`summarize` into ``<name>_seeds/summary.json`` and ``summary.md``
(:func:`write_summary`): per metric the values in seed order, their mean and the sample standard
deviation (``ddof=1``, the spread a reader expects of "mean ± std over seeds"; null for one seed).
An experiment's summary also gets :func:`paired_differences`: each arm minus the first arm within
each seed (same data order and initial weights), the comparison a seed-to-seed spread hides.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .errors import ConfigError
from .io import write_json, write_text

# Bookkeeping numbers of a metrics file that are not results (equal in every seed by construction).
SKIP_KEYS = ("step", "n_samples")
# Properties of the data and the judge (the FID floor, the reference classifier's accuracy): equal
# in every arm of an experiment, so not compared between arms.
CONTEXT_KEYS = ("fid_floor", "reference_accuracy")
SEED_LIMIT = 1 << 32  # every seed is in [0, 2**32): numpy's seed range (accelerate's set_seed)


def check_seed(value: int, key: str) -> int:
    """``value`` when it is a seed in ``[0, 2**32)``, else a one-line ConfigError naming ``key``.

    The one range check of every seed a user gives (``run.seed``, ``sample --seed``, ``--seeds``).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{key}: must be a seed in [0, 2**32), got {value!r}")
    return value


def parse_seeds(text: str) -> List[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: distinct non-negative integers, in the order given."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers like 0,1,2, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds: expected at least one seed, e.g. 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: seeds must be distinct, got {text!r}")
    return [check_seed(s, "--seeds") for s in seeds]


def seed_name(name: str, seed: int) -> str:
    """The name of seed ``seed``'s run or experiment: ``<name>_s<seed>``."""
    return f"{name}_s{seed}"


def seed_dir(folder: Optional[str], seed: int) -> Optional[str]:
    """An explicit folder (``run.dir``, ``experiment.out_dir``) made per seed: ``<folder>_s<seed>``."""
    return None if folder is None else f"{str(folder).rstrip('/')}_s{seed}"


def _number(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def summarize(per_seed: Mapping[int, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``{seed: {metric: value}}`` -> ``{metric: {"values", "seeds", "n", "mean", "std"}}``.

    Every numeric metric that any seed has (booleans, strings and :data:`SKIP_KEYS`, also as the
    last part of ``<arm>/<key>``, are left out);
    ``values``/``seeds`` list the seeds that have it, in the given order; a non-finite value makes
    the mean and std NaN (written as null), so a diverged seed is not averaged away silently.
    """
    keys: List[str] = []
    for metrics in per_seed.values():
        keys += [k for k, v in metrics.items() if k not in keys and _number(v) is not None
                 and k.rsplit("/", 1)[-1] not in SKIP_KEYS]  # also an experiment's "<arm>/step"
    out: Dict[str, Dict[str, Any]] = {}
    for key in keys:
        pairs = [(s, _number(m[key])) for s, m in per_seed.items() if key in m and _number(m[key]) is not None]
        vals = [v for _, v in pairs]
        finite = all(math.isfinite(v) for v in vals)
        mean = statistics.fmean(vals) if finite else math.nan
        std = (statistics.stdev(vals) if len(vals) > 1 else None) if finite else math.nan
        out[key] = {"values": vals, "seeds": [s for s, _ in pairs], "n": len(vals), "mean": mean, "std": std}
    return out


def paired_differences(per_seed: Mapping[int, Mapping[str, Any]], arms: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Within-seed differences of an experiment's ``<arm>/<metric>`` values against the first arm.

    ``{"<arm> - <first>/<metric>": {"values", "seeds", "n", "mean", "std", "positive"}}`` for every
    other arm and every metric both arms have in a seed, but :data:`CONTEXT_KEYS` (``values[i]`` =
    arm minus first arm in ``seeds[i]``; ``positive``: how many of them are > 0), summarised as
    :func:`summarize` does.
    """
    if len(arms) < 2:
        return {}
    first = arms[0]
    diffs: Dict[int, Dict[str, float]] = {}
    for seed, metrics in per_seed.items():
        for arm in arms[1:]:
            for key, v in metrics.items():
                if not key.startswith(f"{first}/"):
                    continue
                metric = key[len(first) + 1:]
                other, base = _number(metrics.get(f"{arm}/{metric}")), _number(v)
                if other is not None and base is not None and metric.rsplit("/", 1)[-1] not in CONTEXT_KEYS:
                    diffs.setdefault(seed, {})[f"{arm} - {first}/{metric}"] = other - base
    out = summarize(diffs)  # which also leaves out SKIP_KEYS
    for entry in out.values():
        entry["positive"] = sum(1 for v in entry["values"] if v > 0)
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def fmt_mean_std(entry: Mapping[str, Any]) -> str:
    """``0.9123 ± 0.0042`` (4 significant digits, std 2); ``—`` for NaN; no ``±`` with one seed."""
    mean, std = entry["mean"], entry["std"]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{mean:.4g}" if std is None else f"{mean:.4g} ± {std:.2g}"


def _values(entry: Mapping[str, Any]) -> str:
    return ", ".join(f"{v:.4g}" for v in entry["values"])


def summary_markdown(title: str, summary: Mapping[str, Any]) -> str:
    """``summary.md``: one row per metric: mean ± std, n, and the per-seed values."""
    metrics = summary["metrics"]
    lines = [f"# {title}", "", f"Seeds {', '.join(str(s) for s in summary['seeds'])}; mean ± sample std (ddof=1) "
             "over the seeds that have the metric.", "", "| metric | mean ± std | n | values |", "|---|---|---|---|"]
    for key, e in metrics.items():
        lines.append(f"| {key} | {fmt_mean_std(e)} | {e['n']} | {_values(e)} |")
    # n is the number of seeds; the samples behind each seed's FID (and other sampled metrics) are
    # the metrics files' own *n_samples counts (equal in every seed by construction).
    counts: Dict[str, set] = {}
    for m in summary.get("per_seed", {}).values():
        for k, v in m.items():
            if k.rsplit("/", 1)[-1].endswith("n_samples") and _number(v) is not None:
                counts.setdefault(k, set()).add(int(v))
    if counts:
        lines += ["", "Samples per seed behind the sampled metrics: "
                  + ", ".join(f"{k} = {'/'.join(map(str, sorted(v)))}" for k, v in counts.items()) + "."]
    paired = summary.get("paired") or {}
    if paired:
        lines += ["", "## Paired differences", "", "Each arm minus the first arm within each seed (same data order and "
                  "initial weights); `> 0` counts the seeds where the difference is positive.", "",
                  "| arm - first arm / metric | mean ± std | > 0 | n | values |", "|---|---|---|---|---|"]
        for key, e in paired.items():
            lines.append(f"| {key} | {fmt_mean_std(e)} | {e['positive']}/{e['n']} | {e['n']} | {_values(e)} |")
    return "\n".join(lines) + "\n"


def write_summary(folder: str | os.PathLike, title: str, seeds: Sequence[int], runs: Mapping[int, str],
                  per_seed: Mapping[int, Mapping[str, Any]], arms: Optional[Sequence[str]] = None,
                  **meta: Any) -> Dict[str, Path]:
    """Write ``summary.json`` (``seeds``, ``runs`` {seed: folder}, ``metrics`` from :func:`summarize`,
    ``per_seed``, with ``arms`` (an experiment's, in its order) ``arms`` and ``paired`` from
    :func:`paired_differences`, and ``meta`` such as provenance) and ``summary.md`` into ``folder``
    atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"title": title, "seeds": list(seeds), "runs": {str(s): str(r) for s, r in runs.items()},
               "metrics": summarize(per_seed), "per_seed": {str(s): dict(m) for s, m in per_seed.items()}, **meta}
    if arms is not None:
        summary["arms"] = list(arms)
        summary["paired"] = paired_differences(per_seed, list(arms))
    paths = {"json": folder / "summary.json", "md": folder / "summary.md"}
    write_json(paths["json"], _json_safe(summary))
    write_text(paths["md"], summary_markdown(title, summary))
    return paths
