"""Named backbone sizes, one registry (STYLE.md habit 4).

A preset is a dict of :class:`~unidiff.models.backbone.HybridBackbone` keyword arguments; configs
pick one with ``model.preset`` and override single keys with ``model.backbone.<key>=...``.
``python -m unidiff.models.presets`` prints every preset's layout and total and active parameter
count for a given image space as the markdown table README.md shows (``--json``: the counts).

Widths follow DiT's S/B/L/XL (384/768/1024/1152). The patterns repeat Nemotron-H's unit ``MEMEM*E``
(2 Mamba, 2-3 MoE, 1 attention per 7 sublayers); ``nano`` is Nemotron 3 Nano's 52-sublayer layout
(23 M, 23 E, 6 ``*``) at a width this codebase can train.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict

from ..errors import ConfigError

NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"  # 23 M, 23 E, 6 *

PRESETS: Dict[str, Dict[str, Any]] = {
    # The size the tests run: every sublayer kind once, tiny widths (seconds on CPU).
    "debug": dict(hidden_size=32, pattern="M*E-", num_heads=2, num_kv_heads=1, d_state=8, headdim=8, chunk_size=16,
                  num_experts=4, top_k=2, num_registers=1, patch_size=2),
    # The embedded-digits default (configs/joint_image_label.yaml): 8x8 images at patch 2 (16 tokens),
    # sized so the main job trains in ~8 minutes on a 2-core CPU.
    "digits": dict(hidden_size=64, pattern="MEM*EM*E", num_heads=4, num_kv_heads=2, d_state=16, headdim=16,
                   chunk_size=32, num_experts=8, top_k=2, num_registers=1, patch_size=2),
    # Twice as wide, patch 1 (64 tokens on 8x8): a stronger digits model for longer runs.
    "tiny": dict(hidden_size=128, pattern="MEM*EMEM*E", num_heads=4, num_kv_heads=2, d_state=16, headdim=32,
                 chunk_size=32, num_experts=8, top_k=2, num_registers=1, patch_size=1),
    "S": dict(hidden_size=384, pattern="MEMEM*E" * 2, num_heads=6, num_kv_heads=2, d_state=64, headdim=64,
              num_experts=8, top_k=2, num_registers=4, patch_size=2),
    "B": dict(hidden_size=768, pattern="MEMEM*E" * 3, num_heads=12, num_kv_heads=4, d_state=64, headdim=64,
              num_experts=16, top_k=2, num_registers=4, patch_size=2),
    "L": dict(hidden_size=1024, pattern="MEMEM*E" * 4, num_heads=16, num_kv_heads=4, d_state=128, headdim=64,
              num_experts=32, top_k=4, latent_size=512, num_registers=4, patch_size=2),
    "XL": dict(hidden_size=1152, pattern="MEMEM*E" * 5, num_heads=16, num_kv_heads=4, d_state=128, headdim=64,
               num_experts=64, top_k=6, latent_size=576, num_registers=4, patch_size=2),
    # Nemotron 3 Nano's layer layout (52 sublayers), 128 routed experts top-6 + shared, LatentMoE.
    "nano": dict(hidden_size=1024, pattern=NANO_PATTERN, num_heads=16, num_kv_heads=2, d_state=128, headdim=64,
                 n_groups=8, num_experts=128, top_k=6, moe_intermediate_size=512, shared_intermediate_size=1024,
                 latent_size=512, routed_scaling_factor=2.5, num_registers=4, patch_size=2),
}


def get_preset(name: str) -> Dict[str, Any]:
    """A copy of the named preset's backbone keyword arguments."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (model.preset); available: {sorted(PRESETS)}")
    return dict(PRESETS[name])


def parameter_table(image_shape=(4, 32, 32)) -> Dict[str, Dict[str, int]]:
    """Total and active parameter counts of every preset for an image space (meta device: no memory)."""
    import torch

    from .backbone import HybridBackbone

    C, H, W = image_shape
    table = {}
    for name, kw in PRESETS.items():
        with torch.device("meta"):
            model = HybridBackbone(in_channels=C, input_size=(H, W), **kw)
        table[name] = {"total": sum(p.numel() for p in model.parameters()), "active": model.num_parameters_active(),
                       "sublayers": len(kw["pattern"])}
    return table


def _layout(pattern: str) -> str:
    """The sublayers column: the pattern itself when short, else its counts per kind."""
    if len(pattern) <= 14:
        return f"{len(pattern)} (`{pattern}`)"
    counts = " / ".join(f"{pattern.count(k)} `{k}`" for k in "ME*-" if k in pattern)
    return f"{len(pattern)} ({counts})"


def markdown_table(image_shape=(4, 32, 32)) -> str:
    """README.md's preset table for an image space: layout, width, routed experts, total and active
    parameters (millions); what ``python -m unidiff.models.presets`` prints."""
    counts = parameter_table(image_shape)
    lines = ["| preset | sublayers | width | routed experts | parameters | active |", "|---|---|---|---|---|---|"]
    for name, kw in PRESETS.items():
        experts = f"{kw['num_experts']} top-{kw['top_k']}" + (", LatentMoE" if kw.get("latent_size") else "")
        c = counts[name]
        lines.append(f"| `{name}` | {_layout(kw['pattern'])} | {kw['hidden_size']} | {experts} | "
                     f"{c['total'] / 1e6:.2f}M | {c['active'] / 1e6:.2f}M |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Print the backbone presets' table (README.md's) for an image space.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--image-shape", type=int, nargs=3, default=[4, 32, 32], metavar=("C", "H", "W"),
                    help="channels, height and width of the diffusion space")
    ap.add_argument("--json", action="store_true", help="print the counts as JSON instead of the markdown table")
    args = ap.parse_args()
    shape = tuple(args.image_shape)
    print(json.dumps(parameter_table(shape), indent=1) if args.json else markdown_table(shape))
