"""The multi-tower image-text representation encoder and its losses (DESIGN.md §4).

Zhu et al. (KDD 2024, "Bringing Multimodality to the Amazon Visual Search System") train image-to-
image matching with a metric-learning loss between a query image and a product image, and add
image-text alignment losses (InfoNCE) against a text tower fed the product title, so the image
embedding learns *concepts* rather than local visual patterns:

- **3-tower**: query image and product image through ONE shared image tower + the title text tower;
- **4-tower**: + a short query text through the SAME text tower.

This module owns the model (:class:`MultiTowerEncoder`), its losses (:func:`multitower_losses`),
its files (:func:`save_encoder` / :func:`load_encoder`) and what the rest of unidiff uses it for:
the frozen image tower gives the representation modality ``r`` of §4 (:func:`encode_images`),
optionally PCA-reduced (``pca.py``), and :func:`unidiff.metrics.recall_at_k` scores it. How it is trained (pairs,
views, the loop, the cache) is ``training.py``.

Legend for shapes: ``B`` batch, ``C, H, W`` image, ``E`` embedding size, ``K`` classes,
``T`` templates per class, ``L`` text tokens, ``N`` images.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..io import atomic_write, write_json
from .text import CharTokenizer, TextTower, title_table

WEIGHTS_NAME = "encoder.safetensors"
CONFIG_NAME = "encoder_config.json"

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
                      title_ids: torch.Tensor, query_ids: Optional[torch.Tensor], *, positives: str = "class",
                      alignment: bool = True, w_image: float = 1.0, w_text: float = 0.5,
                      w_query_text: float = 0.5) -> Dict[str, torch.Tensor]:
    """The training loss of one batch and its terms (Zhu et al. 2024, §3; DESIGN.md §4).

    query, product: (B, C, H, W) the two images of each pair; labels: (B,) their class;
    title_ids / query_ids: (B, L) the sampled title / query phrase of each pair's class.
    The keywords are the :class:`~unidiff.encoders.EncoderConfig` fields of the same names.

    - ``image``: image-image InfoNCE, query -> product and back. Positives are every same-class
      product (``positives="class"``) or only the pair's own product (``"pair"``).
    - ``text`` (when ``alignment``): symmetric image-title InfoNCE, for the query and the product
      image (averaged).
    - ``query_text`` (4-tower): symmetric InfoNCE of the query phrase against both images.
    Titles of one class describe every image of that class, so image-text positives are by class.
    """
    tau = model.temperature
    # One call for both images: the towers share weights, and one larger batch is cheaper.
    q, p = model.encode_image(torch.cat([query, product])).chunk(2)  # (B, E) each
    same_class = labels[:, None] == labels[None, :]  # (B, B)
    ii_mask = same_class if positives == "class" else None
    out = {"image": symmetric_info_nce(q, p, tau, ii_mask)}
    out["text"] = out["query_text"] = torch.zeros((), device=q.device)
    if alignment:
        t = model.encode_text(title_ids)  # (B, E)
        out["text"] = 0.5 * (symmetric_info_nce(q, t, tau, same_class) + symmetric_info_nce(p, t, tau, same_class))
        if model.towers == 4:
            s = model.encode_text(query_ids)  # (B, E)
            out["query_text"] = 0.5 * (symmetric_info_nce(q, s, tau, same_class) + symmetric_info_nce(p, s, tau, same_class))
    out["total"] = w_image * out["image"] + w_text * out["text"] + w_query_text * out["query_text"]
    return out


# --------------------------------------------------------------------------------------------
# Files, embeddings, retrieval
# --------------------------------------------------------------------------------------------
def save_encoder(model: MultiTowerEncoder, out_dir: str | os.PathLike, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write ``encoder.safetensors`` then ``encoder_config.json`` (the config last: its presence
    marks a complete save). ``extra`` (the training config, data fingerprint) goes into the JSON.

    Not :func:`unidiff.checkpoint.export_model`: that is ``save_pretrained`` of a diffusers
    ``ModelMixin``, and this encoder is a plain module whose two files (and their names) are what
    the cache and existing encoder folders hold. Both files go through :mod:`unidiff.io`'s atomic
    writer, so a reader sees the old file or the new one.
    """
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


