"""Training the multi-tower encoder (DESIGN.md §4): pairs, views, the loop, the cache.

``train_encoder(cfg, images, labels, class_names, val_images, val_labels)`` is what ``unidiff
encoder train`` and the joint image-representation experiment call. An "item" is a training
image; its product image is another augmented view of itself or an image of the same class
(:class:`PairSampler`, :func:`augment`), its title a sampled template of its class name
(``text.py``). The loop is one function (:func:`fit_encoder`): AdamW, diffusers' warm-up + cosine
LR schedule (the one unidiff/train.py uses), every random draw from one generator seeded by
``cfg.seed``. The trained encoder is cached in ``cfg.out_dir``, keyed by the config and a hash of
the data; the model, its losses and its files are ``multitower.py``.

Not the main loop's machinery (accelerate, ``unidiff.checkpoint``): the encoder trains in one
process in minutes and is never resumed; a cache hit replaces a finished run, an interrupted run
is simply retrained. Its files are written atomically (``unidiff.io``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from diffusers.optimization import SchedulerType, get_scheduler
from einops import rearrange

from ..errors import ConfigError, DataError
from ..io import write_json
from ..metrics import recall_at_k
from .multitower import (
    CONFIG_NAME,
    TAU_MAX,
    TAU_MIN,
    MultiTowerEncoder,
    encode_images,
    load_encoder,
    multitower_losses,
    save_encoder,
)

METRICS_NAME = "metrics.json"
# diffusers' schedules that need only warm-up and total steps (piecewise_constant needs step rules).
LR_SCHEDULES = tuple(t.value for t in SchedulerType if t is not SchedulerType.PIECEWISE_CONSTANT)


# --------------------------------------------------------------------------------------------
# Views and pairs
# --------------------------------------------------------------------------------------------
def augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1, noise_std: float = 0.05) -> torch.Tensor:
    """Light views for tiny images: a random shift of up to ``max_shift`` pixels + Gaussian noise.

    Pad by ``max_shift`` (edge replicate: the background continues) and crop back at a random
    offset per image. Written with one gather instead of torchvision v2's ``RandomCrop``, which
    draws a single crop per call from the global RNG; here every image gets its own offset from
    ``generator``, so the views are reproducible without touching global random state.

    images: (B, C, H, W) -> (B, C, H, W).
    """
    B, C, H, W = images.shape
    out = images
    if max_shift > 0:
        s = max_shift
        padded = F.pad(images, (s, s, s, s), mode="replicate")  # (B, C, H+2s, W+2s)
        dy, dx = (torch.randint(0, 2 * s + 1, (2, B), generator=generator)).to(images.device)
        rows = dy[:, None] + torch.arange(H, device=images.device)  # (B, H)
        cols = dx[:, None] + torch.arange(W, device=images.device)  # (B, W)
        b = torch.arange(B, device=images.device)[:, None, None]
        out = rearrange(padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]], "b h w c -> b c h w")
    if noise_std > 0:
        out = out + noise_std * torch.randn(out.shape, generator=generator).to(out)
    return out


class PairSampler:
    """Draws (item, partner) index pairs: the partner is the item itself with ``same_item_prob``
    (two views of one item), else a uniformly drawn item of the same class.

    labels: (N,) int64 in [0, K).
    """

    def __init__(self, labels: torch.Tensor, same_item_prob: float):
        self.labels = labels
        self.same_item_prob = float(same_item_prob)
        # Items sorted by class: class k occupies order[start[k] : start[k] + count[k]].
        self.order = torch.argsort(labels, stable=True)
        self.count = torch.bincount(labels)
        self.start = torch.cumsum(self.count, 0) - self.count

    def __call__(self, batch_size: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (item, partner): (B,) int64 each."""
        N = len(self.labels)
        # Distinct items when the data allows: a repeated item would be its own in-batch negative.
        if N >= batch_size:
            item = torch.randperm(N, generator=generator)[:batch_size]
        else:
            item = torch.randint(0, N, (batch_size,), generator=generator)
        y = self.labels[item]
        u = torch.rand(batch_size, generator=generator)
        other = self.order[self.start[y] + (u * self.count[y]).long().clamp_max(self.count[y] - 1)]
        same = torch.rand(batch_size, generator=generator) < self.same_item_prob
        return item, torch.where(same, item, other)


# --------------------------------------------------------------------------------------------
# Config, training, caching
# --------------------------------------------------------------------------------------------
@dataclass
class EncoderConfig:
    """Options of ``unidiff encoder train`` (DESIGN.md §4).

    towers: 3 (query image, product image, title) or 4 (+ query text).
    alignment: image-text losses on (False: image-image only, the ablation).
    positives: "class" (every same-class product is a positive) or "pair" (only the pair's own).
    same_item_prob: chance that a pair is two views of one image rather than two same-class images.
    max_shift / noise_std: the view augmentation (pixels / noise std in [-1, 1] units).
    w_image / w_text / w_query_text: loss weights of the image-image, image-title, query-text terms.
    lr_schedule: a diffusers ``get_scheduler`` name (``LR_SCHEDULES``), with ``warmup_steps`` of
        linear warm-up from 0 and ``steps`` in all ("cosine": a half cosine down to 0).
    ablation: also train the encoder with ``alignment`` flipped and report both recalls.
    out_dir: where ``encoder.safetensors``, ``encoder_config.json``, ``metrics.json`` go
        (None: nothing written, no cache).
    device: "auto" (CUDA when present), "cpu", "cuda", "cuda:N".
    """

    towers: int = 3
    embed_dim: int = 128
    width: int = 32
    text_width: int = 64
    text_layers: int = 1
    text_heads: int = 4
    max_text_len: int = 32
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    lr_schedule: str = "cosine"
    temperature: float = 0.1
    learn_temperature: bool = True
    alignment: bool = True
    w_image: float = 1.0
    w_text: float = 0.5
    w_query_text: float = 0.5
    positives: str = "class"
    same_item_prob: float = 0.5
    max_shift: int = 1
    noise_std: float = 0.05
    seed: int = 0
    ablation: bool = False
    eval_batch_size: int = 512
    log_every: int = 50
    device: str = "auto"
    out_dir: Optional[str] = None

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        checks = [
            ("towers", self.towers in (3, 4), "3 or 4"),
            ("embed_dim", self.embed_dim > 0, "> 0"),
            ("width", self.width > 0 and self.width % 8 == 0, "a positive multiple of 8 (GroupNorm(8))"),
            ("text_heads", self.text_heads > 0 and self.text_width % self.text_heads == 0, "a divisor of text_width"),
            ("text_layers", self.text_layers >= 0, ">= 0"),
            ("max_text_len", self.max_text_len > 0, "> 0"),
            ("steps", self.steps >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 2, ">= 2 (in-batch negatives)"),
            ("lr", self.lr > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}"),
            ("temperature", TAU_MIN <= self.temperature <= TAU_MAX, f"in [{TAU_MIN}, {TAU_MAX}]"),
            ("positives", self.positives in ("class", "pair"), "'class' or 'pair'"),
            ("same_item_prob", 0.0 <= self.same_item_prob <= 1.0, "in [0, 1]"),
            ("max_shift", self.max_shift >= 0, ">= 0"),
            ("noise_std", self.noise_std >= 0, ">= 0"),
            ("w_image", self.w_image >= 0, ">= 0"),
            ("w_text", self.w_text >= 0, ">= 0"),
            ("w_query_text", self.w_query_text >= 0, ">= 0"),
            ("eval_batch_size", self.eval_batch_size > 0, "> 0"),
            ("log_every", self.log_every > 0, "> 0"),
            ("device", self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"), "auto, cpu, cuda or cuda:N"),
        ]
        for key, ok, want in checks:
            if not ok:
                raise ConfigError(f"encoder.{key}={getattr(self, key)!r}: must be {want}")

    def cache_key(self) -> Dict[str, Any]:
        """The fields that decide the trained weights (not where they go or what is also reported)."""
        d = asdict(self)
        for k in ("out_dir", "ablation", "device", "eval_batch_size", "log_every"):
            d.pop(k)
        return json.loads(json.dumps(d))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"encoder.device={name!r} but CUDA is not available")
    return torch.device(name)


def _check_data(images, labels, class_names, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(images).float()
    labels = torch.as_tensor(labels).long()
    if images.ndim != 4:
        raise DataError(f"{what} images must be (N, C, H, W); got shape {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise DataError(f"{what} labels must be ({len(images)},); got shape {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(f"{what} labels must lie in [0, {len(class_names)}) (one per class name); got [{int(labels.min())}, {int(labels.max())}]")
    return images.contiguous(), labels.contiguous()


def _fingerprint(*arrays: torch.Tensor, class_names: Sequence[str]) -> str:
    """sha256 of the data the weights and metrics depend on: a cache hit needs the same data."""
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            h.update(str(tuple(a.shape)).encode())
            h.update(a.contiguous().numpy().tobytes())
    h.update(json.dumps([str(c) for c in class_names]).encode())
    return h.hexdigest()


def _load_cached(cfg: "EncoderConfig", fingerprint: str) -> Optional[Tuple[MultiTowerEncoder, Dict[str, Any]]]:
    """The saved encoder and metrics when ``out_dir`` holds one trained with this config and data."""
    out = Path(cfg.out_dir)
    try:
        meta = json.loads((out / CONFIG_NAME).read_text())
        metrics = json.loads((out / METRICS_NAME).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("encoder") != cfg.cache_key() or meta.get("data") != fingerprint:
        return None
    return load_encoder(out), metrics


def _evaluate(model: MultiTowerEncoder, images, labels, cfg: EncoderConfig) -> Dict[str, float]:
    if images is None or len(images) < 6:
        return {}
    emb = encode_images(model, images, cfg.eval_batch_size)
    return recall_at_k(emb, labels, emb, labels, ks=(1, 5), exclude_self=True)


def fit_encoder(cfg: EncoderConfig, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                val_images: Optional[torch.Tensor], val_labels: Optional[torch.Tensor]) -> Tuple[MultiTowerEncoder, Dict[str, Any]]:
    """The training loop proper (no files). Deterministic under ``cfg.seed`` on a given device."""
    device = _resolve_device(cfg.device)
    # Weights from a forked global RNG (module init uses it), everything else from one generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = MultiTowerEncoder(
            in_channels=images.shape[1], image_size=images.shape[2:], class_names=class_names, towers=cfg.towers,
            embed_dim=cfg.embed_dim, width=cfg.width, text_width=cfg.text_width, text_layers=cfg.text_layers,
            text_heads=cfg.text_heads, max_text_len=cfg.max_text_len, temperature=cfg.temperature,
            learn_temperature=cfg.learn_temperature,
        ).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = PairSampler(labels, cfg.same_item_prob)
    # No weight decay on τ, norms and biases (1-D tensors), as in CLIP.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=True)
    # diffusers' schedules, as unidiff/train.py: stepped once per optimiser step.
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)

    metrics: Dict[str, Any] = {f"{k}_init": v for k, v in _evaluate(model, val_images, val_labels, cfg).items()}
    history: Dict[str, List[float]] = {"total": [], "image": [], "text": [], "query_text": []}
    curve = []
    n_tpl, n_qry = model.titles.shape[1], model.queries.shape[1]
    t0 = time.time()
    model.train()
    for step in range(cfg.steps):
        item, partner = sampler(cfg.batch_size, gen)
        y = labels[item]
        query = augment(images[item], gen, cfg.max_shift, cfg.noise_std).to(device)
        product = augment(images[partner], gen, cfg.max_shift, cfg.noise_std).to(device)
        # One sampled title / query phrase of the item's class each (DESIGN.md §4 templates).
        title_ids = model.titles[y.to(device), torch.randint(0, n_tpl, (len(y),), generator=gen).to(device)]
        query_ids = model.queries[y.to(device), torch.randint(0, n_qry, (len(y),), generator=gen).to(device)]
        losses = multitower_losses(model, query, product, y.to(device), title_ids, query_ids, positives=cfg.positives,
                                   alignment=cfg.alignment, w_image=cfg.w_image, w_text=cfg.w_text,
                                   w_query_text=cfg.w_query_text)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        lr = opt.param_groups[0]["lr"]  # this step's rate, logged before the schedule moves on
        opt.step()
        sched.step()
        # One host sync per step for the whole row of loss terms.
        row = torch.stack([losses[k].detach() for k in history]).tolist()
        for k, v in zip(history, row):
            history[k].append(v)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            curve.append({"step": step, **{k: v[-1] for k, v in history.items()}, "lr": lr,
                          "temperature": float(model.temperature.detach())})
    model.eval()

    # Start/end losses averaged over 10 steps: single batches are too noisy to compare.
    w = min(10, cfg.steps)
    if cfg.steps:
        metrics["loss_start"] = {k: sum(v[:w]) / w for k, v in history.items()}
        metrics["loss_end"] = {k: sum(v[-w:]) / w for k, v in history.items()}
    metrics.update(_evaluate(model, val_images, val_labels, cfg))
    metrics.update(
        towers=cfg.towers, alignment=cfg.alignment, steps=cfg.steps, temperature=float(model.temperature.detach()),
        train_seconds=time.time() - t0, loss_curve=curve,
    )
    return model, metrics


def train_encoder(cfg: EncoderConfig, train_images: torch.Tensor, train_labels: torch.Tensor, class_names: Sequence[str],
                  val_images: Optional[torch.Tensor] = None, val_labels: Optional[torch.Tensor] = None) -> Tuple[MultiTowerEncoder, Dict[str, Any]]:
    """Train (or load from the cache) the multi-tower encoder.

    train_images: (N, C, H, W) in [-1, 1]; train_labels: (N,) int64 in [0, K); class_names: K
    names (titles and query phrases are made from them). val_*: the Recall@K split (optional).

    With ``cfg.out_dir`` set: if it already holds an encoder trained with the same
    ``cfg.cache_key()`` on the same data, that one is loaded and returned with
    ``metrics["cached"] = True``; otherwise the encoder is trained and ``encoder.safetensors``,
    ``encoder_config.json`` and ``metrics.json`` are written. ``cfg.ablation`` also trains the
    variant with ``alignment`` flipped (in ``out_dir/ablation_<alignment|no_alignment>``, cached the
    same way) and adds ``metrics["ablation"] = {"alignment": {...}, "no_alignment": {...}}``.

    Returns ``(model, metrics)`` with the model in eval mode.
    """
    cfg.validate()
    if len(class_names) == 0 or any(not str(c).strip() for c in class_names):
        raise DataError(f"class_names must be K non-empty names; got {list(class_names)!r}")
    images, labels = _check_data(train_images, train_labels, class_names, "train")
    if val_images is not None:
        val_images, val_labels = _check_data(val_images, val_labels, class_names, "val")
    fingerprint = _fingerprint(images, labels, val_images, val_labels, class_names=class_names)

    cached = _load_cached(cfg, fingerprint) if cfg.out_dir else None
    if cached is not None:
        model, metrics = cached
        metrics["cached"] = True
    else:
        model, metrics = fit_encoder(cfg, images, labels, class_names, val_images, val_labels)
        metrics["cached"] = False

    if cfg.ablation:
        # The visual-search paper's ablation in miniature: same everything, alignment flipped.
        flip = "no_alignment" if cfg.alignment else "alignment"
        sub = str(Path(cfg.out_dir) / f"ablation_{flip}") if cfg.out_dir else None
        _, other = train_encoder(replace(cfg, alignment=not cfg.alignment, ablation=False, out_dir=sub),
                                 images, labels, class_names, val_images, val_labels)
        pick = lambda m: {k: m[k] for k in ("recall@1", "recall@5", "recall@1_init", "recall@5_init") if k in m}
        mine = "alignment" if cfg.alignment else "no_alignment"
        metrics["ablation"] = {mine: pick(metrics), flip: pick(other)}

    if cfg.out_dir and (not metrics["cached"] or cfg.ablation):
        if not metrics["cached"]:
            save_encoder(model, cfg.out_dir, extra={"encoder": cfg.cache_key(), "data": fingerprint})
        out = Path(cfg.out_dir)
        stored = {k: v for k, v in metrics.items() if k != "cached"}
        write_json(out / METRICS_NAME, stored, indent=2)
    return model, metrics
