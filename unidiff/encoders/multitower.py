"""The multi-tower image-text representation encoder (DESIGN.md §4).

Zhu et al. (KDD 2024, "Bringing Multimodality to the Amazon Visual Search System") train image-to-
image matching with a metric-learning loss between a query image and a product image, and add
image-text alignment losses (InfoNCE) against a text tower fed the product title, so the image
embedding learns *concepts* rather than local visual patterns:

- **3-tower**: query image and product image through ONE shared image tower + the title text tower;
- **4-tower**: + a short query text through the SAME text tower.

Here an "item" is a training image; its product image is another augmented view of itself or an
image of the same class, its title a sampled template of its class name (``text.py``). The frozen
image tower then gives the representation modality ``r`` of §4 (``encode_images``), optionally
PCA-reduced (``pca.py``).

Legend for shapes: ``B`` batch, ``C, H, W`` image, ``E`` embedding size, ``K`` classes,
``T`` templates per class, ``L`` text tokens, ``N`` images.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError
from ..io import atomic_write, write_json
from .text import CharTokenizer, TextTower, title_table

WEIGHTS_NAME = "encoder.safetensors"
CONFIG_NAME = "encoder_config.json"
METRICS_NAME = "metrics.json"

# CLIP clamps its logit scale at 100 (τ >= 0.01); the upper bound keeps a learned τ from
# flattening the softmax towards uniform.
TAU_MIN, TAU_MAX = 0.01, 1.0


# --------------------------------------------------------------------------------------------
# Towers
# --------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, GELU, 3x3 conv) x 2 at constant width."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, ch), nn.GELU(), nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(8, ch), nn.GELU(), nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ImageTower(nn.Module):
    """Small conv net -> projection MLP -> L2-normalised embedding.

    Stride-2 stages halve the resolution until it is at most 4x4 (one stage for 8x8 digits, six
    for 224x224); the final map is *flattened*, not pooled, because on tiny images the position
    of a stroke is most of what tells classes apart.

    Args:
        in_channels: image channels C.
        image_size: ``(H, W)``.
        width: channels of the first stage (doubles per stage, capped at 4x).
        embed_dim: output size E.
    """

    def __init__(self, in_channels: int, image_size: Sequence[int], width: int, embed_dim: int):
        super().__init__()
        h, w = (int(s) for s in image_size)
        ch = width
        layers: List[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        while max(h, w) > 4:
            out = min(2 * ch, 4 * width)
            layers += [ResBlock(ch), nn.Conv2d(ch, out, 3, stride=2, padding=1)]
            ch, h, w = out, (h + 1) // 2, (w + 1) // 2
        layers += [ResBlock(ch), nn.GroupNorm(8, ch), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Linear(ch * h * w, 4 * width), nn.GELU(), nn.Linear(4 * width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] -> (B, E) unit vectors."""
        f = self.features(x)  # (B, ch, h, w), h, w <= 4
        return F.normalize(self.proj(rearrange(f, "b c h w -> b (c h w)")), dim=-1)


class MultiTowerEncoder(nn.Module):
    """Shared image tower + shared text tower + temperature (DESIGN.md §4).

    The query-image and product-image "towers" are one module called twice (shared weights),
    and likewise the title and query-text towers; ``towers`` only decides which losses exist.

    Args:
        in_channels, image_size: the image shape the image tower is built for.
        class_names: K class names; the title and query tables are built from them.
        towers: 3 or 4 (4 adds the query-text tower and its losses).
        embed_dim: E. width: image tower base width. text_width / text_layers / text_heads /
            max_text_len: the text tower.
        temperature: τ of every InfoNCE (initial value when learned).
        learn_temperature: learn log τ (clamped to [0.01, 1]) or keep it fixed.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int],
        class_names: Sequence[str],
        towers: int = 3,
        embed_dim: int = 128,
        width: int = 32,
        text_width: int = 64,
        text_layers: int = 1,
        text_heads: int = 4,
        max_text_len: int = 32,
        temperature: float = 0.1,
        learn_temperature: bool = True,
    ):
        super().__init__()
        self.config = dict(
            in_channels=int(in_channels), image_size=[int(s) for s in image_size], class_names=[str(c) for c in class_names],
            towers=int(towers), embed_dim=int(embed_dim), width=int(width), text_width=int(text_width),
            text_layers=int(text_layers), text_heads=int(text_heads), max_text_len=int(max_text_len),
            temperature=float(temperature), learn_temperature=bool(learn_temperature),
        )
        self.towers = int(towers)
        self.image_tower = ImageTower(in_channels, image_size, width, embed_dim)
        self.tokenizer = CharTokenizer(max_text_len)
        self.text_tower = TextTower(self.tokenizer.vocab_size, text_width, embed_dim, text_layers, text_heads, max_text_len)
        # log-parametrised τ (CLIP): positive by construction, multiplicative steps.
        log_tau = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        # Derived from class_names, so not saved: (K, T, L) title and query token ids.
        self.register_buffer("titles", title_table(class_names, self.tokenizer), persistent=False)
        self.register_buffer("queries", title_table(class_names, self.tokenizer, queries=True), persistent=False)

    @property
    def temperature(self) -> torch.Tensor:
        """τ, a scalar tensor in [TAU_MIN, TAU_MAX] (differentiable when learned)."""
        return self.log_tau.exp().clamp(TAU_MIN, TAU_MAX)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, E) unit vectors."""
        return self.image_tower(images)

    def encode_text(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """B strings or (B, L) token ids -> (B, E) unit vectors.

        Titles come from K x T templates, so a batch repeats them: the tower runs once per
        distinct sequence and the result is scattered back (same value and gradient, far cheaper).
        """
        ids = texts if torch.is_tensor(texts) else self.tokenizer(texts)
        uniq, inverse = torch.unique(ids.to(self.log_tau.device), dim=0, return_inverse=True)  # (U, L), (B,)
        return self.text_tower(uniq)[inverse]


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def info_nce(anchor: torch.Tensor, candidates: torch.Tensor, temperature: torch.Tensor | float,
             pos_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InfoNCE of each anchor against in-batch candidates, averaged over anchors.

    ``ℓ_i = -1/|P(i)| Σ_{p∈P(i)} log softmax_j(a_i·c_j / τ)_p`` (supervised-contrastive masking,
    Khosla et al. 2020, "L_out"): with several same-class candidates each is a positive, and none
    of them is pushed away as a negative. ``pos_mask=None`` is the diagonal (classic InfoNCE:
    candidate ``i`` is anchor ``i``'s only positive). Anchors without a positive are skipped.

    anchor: (B, E), candidates: (M, E), pos_mask: (B, M) bool -> scalar.
    """
    logits = anchor @ candidates.T / temperature  # (B, M)
    if pos_mask is None:
        return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))
    # log-softmax in at least fp32 (bf16 logits would round the normaliser).
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=1)  # (B, M)
    pos = pos_mask.to(logp.dtype)
    n_pos = pos.sum(1)  # (B,)
    per_anchor = -(logp * pos).sum(1) / n_pos.clamp_min(1.0)
    has = n_pos > 0
    return per_anchor[has].mean() if has.any() else logits.sum() * 0.0


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, temperature, pos_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP's symmetric loss: ½ [InfoNCE(a→b) + InfoNCE(b→a)]. a: (B, E), b: (B, E), mask (B, B)."""
    back = None if pos_mask is None else pos_mask.T
    return 0.5 * (info_nce(a, b, temperature, pos_mask) + info_nce(b, a, temperature, back))


def multitower_losses(model: MultiTowerEncoder, query: torch.Tensor, product: torch.Tensor, labels: torch.Tensor,
                      title_ids: torch.Tensor, query_ids: Optional[torch.Tensor], cfg: "EncoderConfig") -> Dict[str, torch.Tensor]:
    """The training loss of one batch and its terms (Zhu et al. 2024, §3; DESIGN.md §4).

    query, product: (B, C, H, W) the two images of each pair; labels: (B,) their class;
    title_ids / query_ids: (B, L) the sampled title / query phrase of each pair's class.

    - ``image``: image-image InfoNCE, query -> product and back. Positives are every same-class
      product (``positives="class"``) or only the pair's own product (``"pair"``).
    - ``text``: symmetric image-title InfoNCE, for the query and the product image (averaged).
    - ``query_text`` (4-tower): symmetric InfoNCE of the query phrase against both images.
    Titles of one class describe every image of that class, so image-text positives are by class.
    """
    tau = model.temperature
    # One call for both images: the towers share weights, and one larger batch is cheaper.
    q, p = model.encode_image(torch.cat([query, product])).chunk(2)  # (B, E) each
    same_class = labels[:, None] == labels[None, :]  # (B, B)
    ii_mask = same_class if cfg.positives == "class" else None
    out = {"image": symmetric_info_nce(q, p, tau, ii_mask)}
    out["text"] = out["query_text"] = torch.zeros((), device=q.device)
    if cfg.alignment:
        t = model.encode_text(title_ids)  # (B, E)
        out["text"] = 0.5 * (symmetric_info_nce(q, t, tau, same_class) + symmetric_info_nce(p, t, tau, same_class))
        if model.towers == 4:
            s = model.encode_text(query_ids)  # (B, E)
            out["query_text"] = 0.5 * (symmetric_info_nce(q, s, tau, same_class) + symmetric_info_nce(p, s, tau, same_class))
    out["total"] = cfg.w_image * out["image"] + cfg.w_text * out["text"] + cfg.w_query_text * out["query_text"]
    return out


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


def save_encoder(model: MultiTowerEncoder, out_dir: str | os.PathLike, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write ``encoder.safetensors`` then ``encoder_config.json`` (the config last: its presence
    marks a complete save). ``extra`` (the training config, data fingerprint) goes into the JSON."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, p))
    meta = {"model": model.config, **(extra or {})}
    write_json(out / CONFIG_NAME, meta, indent=2)


def load_encoder(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> MultiTowerEncoder:
    """Rebuild a :class:`MultiTowerEncoder` from ``out_dir`` (eval mode)."""
    out = Path(out_dir)
    cfg_path, w_path = out / CONFIG_NAME, out / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"no trained encoder in {str(out)!r}: {p.name} is missing (run `unidiff encoder train`)")
    try:
        meta = json.loads(cfg_path.read_text())
        model = MultiTowerEncoder(**meta["model"])
        model.load_state_dict(load_file(str(w_path)))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the encoder in {str(out)!r}: {e}") from e
    return model.to(device).eval()


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


@torch.no_grad()
def encode_images(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Image-tower embeddings, the representation modality ``r`` of DESIGN.md §4.

    model: a :class:`MultiTowerEncoder` (or any module with ``encode_image``, or a callable
    images -> features). images: (N, C, H, W) in [-1, 1] -> (N, E) float32 on the CPU.
    """
    fn = getattr(model, "encode_image", model)
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
        device = next(model.parameters(), torch.empty(0)).device
    else:
        device = torch.device("cpu")
    try:
        chunks = [fn(images[i : i + batch_size].to(device).float()).float().cpu() for i in range(0, len(images), batch_size)]
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def recall_at_k(query_emb: torch.Tensor, gallery_emb: torch.Tensor, query_labels: torch.Tensor, gallery_labels: torch.Tensor,
                ks: Sequence[int] = (1, 5), exclude_self: bool = True, chunk: int = 1024) -> Dict[str, float]:
    """Image-to-image Recall@K by cosine similarity: the fraction of queries with at least one
    same-class item among their K nearest gallery items.

    ``exclude_self``: query ``i`` *is* gallery item ``i`` (val against itself), so it is not its
    own neighbour. query_emb: (Nq, E), gallery_emb: (Ng, E), labels (Nq,), (Ng,).
    Returns ``{"recall@K": float}`` per K.
    """
    q = F.normalize(torch.as_tensor(query_emb).float(), dim=-1)
    g = F.normalize(torch.as_tensor(gallery_emb).float(), dim=-1)
    ql, gl = torch.as_tensor(query_labels).long(), torch.as_tensor(gallery_labels).long()
    if exclude_self and len(q) != len(g):
        raise ConfigError(f"recall_at_k(exclude_self=True) needs the query set to be the gallery; got {len(q)} queries and {len(g)} gallery items")
    kmax = max(ks)
    if kmax > len(g) - int(exclude_self):
        raise ConfigError(f"recall_at_k: K={kmax} exceeds the {len(g) - int(exclude_self)} candidate gallery items")
    hits = {k: 0 for k in ks}
    for s in range(0, len(q), chunk):
        sim = q[s : s + chunk] @ g.T  # (c, Ng)
        if exclude_self:
            r = torch.arange(len(sim))
            sim[r, s + r] = -float("inf")
        top = sim.topk(kmax, dim=1).indices  # (c, kmax), most similar first
        match = gl[top] == ql[s : s + chunk, None]  # (c, kmax)
        for k in ks:
            hits[k] += int(match[:, :k].any(dim=1).sum())
    return {f"recall@{k}": hits[k] / max(len(q), 1) for k in ks}


def _evaluate(model: MultiTowerEncoder, images, labels, cfg: EncoderConfig) -> Dict[str, float]:
    if images is None or len(images) < 6:
        return {}
    emb = encode_images(model, images, cfg.eval_batch_size)
    return recall_at_k(emb, emb, labels, labels, ks=(1, 5), exclude_self=True)


def _train(cfg: EncoderConfig, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
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
    # Linear warm-up then cosine decay to 10% of lr.
    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

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
        losses = multitower_losses(model, query, product, y.to(device), title_ids, query_ids, cfg)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
        sched.step()
        # One host sync per step for the whole row of loss terms.
        row = torch.stack([losses[k].detach() for k in history]).tolist()
        for k, v in zip(history, row):
            history[k].append(v)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            curve.append({"step": step, **{k: v[-1] for k, v in history.items()}, "temperature": float(model.temperature.detach())})
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
        model, metrics = _train(cfg, images, labels, class_names, val_images, val_labels)
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
