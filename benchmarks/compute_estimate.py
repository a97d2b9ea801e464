"""Compute estimate of the ImageNet configs (issue 9): the model's own FLOP count -> GPU-hours.

    python benchmarks/compute_estimate.py                       # every configs/imagenet*.yaml, JSON to stdout
    python benchmarks/compute_estimate.py --mfu 0.35 --peak-tflops 989 --out estimate.json
    python benchmarks/compute_estimate.py --preset debug configs/imagenet64_joint_image_label.yaml   (a quick check)

For each config the full training forward (the objective: modality encoders, drift, backbone,
every head, the losses; :class:`unidiff.diffusion.MultiModalDiffusion`) runs once on a CPU batch of
one image of the config's diffusion space (pixels ``(3, s, s)``, or the latents of an SD-type VAE
``(4, s/8, s/8)`` for a config with ``model.vae.path``; 1000 classes), with the FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, the SSD's einsums; elementwise
work is not counted, as in every MFU figure). The attention cores are added by hand when the counter
sees no SDPA kernel (it reports 0 for the CPU flash kernel; ``sdpa_flops`` of bench_backbone.py):
``4 · L² · D`` per ``*`` sublayer and image. Training FLOPs per image = 3 x forward (backward ≈ 2 x
forward). Then, at the config's global batch B on one GPU of ``--peak-tflops`` dense bf16 at model
FLOP utilisation ``--mfu``:

    images/s = mfu · peak / (3 · F_fwd),    GPU-hours per 100k steps = 1e5 · B / (images/s) / 3600

(on N GPUs: the same GPU-hours, N times fewer hours of wall clock at equal MFU). Sampling, evaluation
and the data pipeline are not included; for latent configs ``vae_encode`` gives the one-time cost of
the cache (the VAE encoder's FLOPs per image, counted on a randomly initialised Stable Diffusion VAE
of the same architecture, and GPU-hours for the ImageNet train set with flipped copies). Nothing
here was measured on a GPU (no GPU was lent to this task): the MFU is an assumption, stated in the
output.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from unidiff.config import build_model, load_config, read_yaml, resolve_with_data  # noqa: E402
from unidiff.data import DataInfo  # noqa: E402
from unidiff.train import build_objective  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100/H200 SXM, dense bf16 tensor cores (no sparsity)
IMAGENET_TRAIN = 1_281_167
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4, norm_num_groups=32, sample_size=256)


def diffusion_space(data: Dict[str, Any], model: Dict[str, Any]):
    """(C, H, W) the config diffuses in: pixels, or an SD-type VAE's latents (factor 8, 4 channels)."""
    size = int(data["image_size"])
    if (model.get("vae") or {}).get("path"):
        return (4, size // 8, size // 8)
    return (3, size, size)


def load_full_size(path: str, preset: Optional[str] = None):
    """``(cfg, model, image_shape)``: a config resolved against a stand-in of its data (1000 classes,
    its diffusion space) and its model at full size, without the data itself. ``preset`` replaces
    ``model.preset`` (tests: a small model)."""
    raw = read_yaml(path)
    shape = diffusion_space(raw["data"], raw.get("model", {}))
    latent = bool((raw.get("model", {}).get("vae") or {}).get("path"))
    raw["data"] = {"name": "digits"}  # the schema needs a registered source; the data is never read
    overrides = [f"model.preset={preset}"] if preset else []
    cfg = load_config(raw, overrides)
    meta = None
    if latent:
        meta = {"folder": "(stand-in)", "vae": {"path": cfg.model.vae.path, "scaling_factor": 0.18215,
                                                "shift_factor": 0.0}, "pixel_shape": [3, shape[1] * 8, shape[2] * 8],
                "latent_shape": list(shape)}
    info = DataInfo(name="imagenet", image_shape=shape, num_classes=1000, latents=meta)
    cfg = resolve_with_data(cfg, info)
    return cfg, build_model(cfg, shape), shape


def attention_flops_per_image(model, shape) -> int:
    """Forward FLOPs of the attention cores (QKᵀ and AV) per image: 4 · L² · D per ``*`` sublayer."""
    bb = model.backbone.config
    p = int(bb["patch_size"])
    tokens = (shape[1] // p) * (shape[2] // p) + int(bb.get("num_registers", 0))
    width = int(bb["num_heads"]) * int(bb.get("head_dim") or bb["hidden_size"] // bb["num_heads"])
    return 4 * tokens * tokens * width * bb["pattern"].count("*")


@torch.no_grad()
def forward_flops(cfg, model, shape) -> Dict[str, int]:
    """Counted forward FLOPs of the training objective on one image (+ label)."""
    objective = build_objective(cfg, model).eval()
    batch = {"image": torch.randn(1, *shape).clamp(-1, 1), "label": torch.zeros(1, dtype=torch.long)}
    counter = FlopCounterMode(display=False)
    with counter:
        objective(batch, generator=torch.Generator().manual_seed(0))
    by_op = {str(op).split(".")[-1]: int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    counted = int(counter.get_total_flops())
    sdpa_counted = any("scaled_dot_product" in op and n > 0 for op, n in by_op.items())
    attn = 0 if sdpa_counted else attention_flops_per_image(model, shape)
    return {"counted": counted, "attention_by_hand": attn, "total": counted + attn}


@torch.no_grad()
def vae_encoder_flops(size: int) -> int:
    """Forward FLOPs of an SD-type VAE encoder on one ``size``² RGB image (random weights: same FLOPs)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**SD_VAE).eval()
    counter = FlopCounterMode(display=False)
    with counter:
        vae.encode(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops())


def estimate(path: str, mfu: float, peak_tflops: float, preset: Optional[str] = None, vae: bool = True) -> Dict[str, Any]:
    cfg, model, shape = load_full_size(path, preset)
    flops = forward_flops(cfg, model, shape)
    sustained = mfu * peak_tflops * 1e12  # FLOP/s
    train_flops = 3 * flops["total"]
    images_per_s = sustained / train_flops
    batch = int(cfg.train.batch_size)
    out = {
        "config": str(Path(path).relative_to(ROOT)) if Path(path).resolve().is_relative_to(ROOT) else str(path),
        "preset": cfg.model.preset, "diffusion_space": list(shape),
        "tokens": (shape[1] // int(model.backbone.config["patch_size"])) * (shape[2] // int(model.backbone.config["patch_size"])),
        "modalities": [m.kind for m in cfg.modalities],
        "parameters": sum(p.numel() for p in model.parameters()),
        "active_backbone_parameters": model.backbone.num_parameters_active(),
        "forward_gflops_per_image": flops["total"] / 1e9,
        "forward_gflops_counted": flops["counted"] / 1e9,
        "forward_gflops_attention_by_hand": flops["attention_by_hand"] / 1e9,
        "train_gflops_per_image": train_flops / 1e9,
        "batch_size": batch,
        "images_per_s_per_gpu": images_per_s,
        "steps_per_s_per_gpu": images_per_s / batch,
        "gpu_hours_per_100k_steps": 1e5 * batch / images_per_s / 3600,
        "configured_steps": int(cfg.train.steps),
        "gpu_hours_configured_steps": int(cfg.train.steps) * batch / images_per_s / 3600,
    }
    if vae and cfg.model.vae.path is not None:
        size = shape[1] * 8
        enc = vae_encoder_flops(size)
        n = IMAGENET_TRAIN * (2 if read_yaml(path)["data"].get("hflip") else 1)
        out["vae_encode"] = {"gflops_per_image": enc / 1e9, "images": n,
                             "gpu_hours": n * enc / sustained / 3600}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", help="run configs (default: configs/imagenet*.yaml)")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOP utilisation (default 0.35)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                    help="GPU peak dense bf16 TFLOP/s (default 989: H200 SXM)")
    ap.add_argument("--preset", default=None, help="replace model.preset (a quick check at a small size)")
    ap.add_argument("--no-vae", action="store_true", help="skip the VAE encoder count of latent configs")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = args.configs or sorted(glob.glob(str(ROOT / "configs" / "imagenet*.yaml")))
    rows = [estimate(p, args.mfu, args.peak_tflops, args.preset, not args.no_vae) for p in paths]
    res = {"assumptions": {"gpu": "H200 SXM", "peak_bf16_dense_tflops": args.peak_tflops, "mfu": args.mfu,
                           "train_flops": "3 x forward", "measured_on_gpu": False},
           "configs": rows}
    text = json.dumps(res, indent=1)
    print(text)
    if args.out is not None:
        from unidiff.io import write_text

        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
