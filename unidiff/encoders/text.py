"""The text side of the multi-tower encoder: titles, query phrases, tokenizer, text tower.

DESIGN.md §4: the text tower reads the item's *title*; for class-labelled data the title is made
from the class name with a few templates ("a handwritten three", "the digit 3"), sampled per
item, so the tower cannot key on one fixed string. The 4-tower variant adds a short *query text*
("three", "digit 3") through the same tower (Zhu et al., KDD 2024, Fig. 4: the two text encoders
share weights).

The tokenizer is character-level with a fixed alphabet: it needs no fitting, so a saved encoder
reads any folder name, and the vocabulary cannot drift between training and loading.

Legend for shapes: ``B`` batch, ``L`` tokens, ``D`` text width, ``E`` embedding size.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: the number word, {d}: the numeral. Several phrasings per class (title augmentation).
DIGIT_TITLE_TEMPLATES = (
    "a handwritten {w}",
    "the digit {d}",
    "a scanned number {w}",
    "a handwritten digit {d}",
    "the number {w}",
    "an image of the digit {w}",
)
DIGIT_QUERY_TEMPLATES = ("{w}", "digit {d}", "{d}")
# {n}: the cleaned class (folder) name.
GENERIC_TITLE_TEMPLATES = ("a photo of a {n}", "an image of a {n}", "a picture of the {n}", "{n}", "a {n}")
GENERIC_QUERY_TEMPLATES = ("{n}", "a {n}")

PAD, UNK = 0, 1
ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789-'.,&/()"


def _digit_of(name: str) -> int | None:
    """The digit a class name stands for ("3", "three", "digit_3"), else ``None``."""
    n = clean_name(name)
    for prefix in ("digit ", "number "):
        n = n[len(prefix):] if n.startswith(prefix) else n
    if n.isdigit() and len(n) == 1:
        return int(n)
    return DIGIT_WORDS.index(n) if n in DIGIT_WORDS else None


def clean_name(name: str) -> str:
    """Folder name -> words: ``"golden_retriever"`` -> ``"golden retriever"``."""
    return " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())


def class_titles(name: str) -> List[str]:
    """All title strings of one class (digits get the digit templates, others the generic ones)."""
    d = _digit_of(name)
    if d is not None:
        return [t.format(w=DIGIT_WORDS[d], d=d) for t in DIGIT_TITLE_TEMPLATES]
    return [t.format(n=clean_name(name)) for t in GENERIC_TITLE_TEMPLATES]


def class_queries(name: str) -> List[str]:
    """All short query phrases of one class (the 4-tower model's query text)."""
    d = _digit_of(name)
    if d is not None:
        return [t.format(w=DIGIT_WORDS[d], d=d) for t in DIGIT_QUERY_TEMPLATES]
    return [t.format(n=clean_name(name)) for t in GENERIC_QUERY_TEMPLATES]


class CharTokenizer:
    """Lower-cased characters -> ids; 0 is padding, 1 unknown; truncates to ``max_len``."""

    def __init__(self, max_len: int = 32):
        self.max_len = int(max_len)
        self.stoi = {c: i + 2 for i, c in enumerate(ALPHABET)}
        self.vocab_size = len(ALPHABET) + 2

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """texts: B strings -> (B, max_len) int64 ids, right-padded with ``PAD``."""
        ids = torch.full((len(texts), self.max_len), PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            row = [self.stoi.get(c, UNK) for c in str(t).lower()[: self.max_len]]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids


def title_table(class_names: Sequence[str], tokenizer: CharTokenizer, queries: bool = False) -> torch.Tensor:
    """Token ids of every (class, template) pair: (K, T, max_len).

    Classes with fewer templates than the largest count repeat theirs cyclically, so one
    uniform template index per item samples every class's phrasings evenly.
    """
    per_class = [class_queries(n) if queries else class_titles(n) for n in class_names]
    T = max(len(p) for p in per_class)
    flat = [p[j % len(p)] for p in per_class for j in range(T)]
    return tokenizer(flat).view(len(class_names), T, tokenizer.max_len)


class TextTower(nn.Module):
    """Character embedding + a small pre-norm transformer + masked mean pool -> unit vector.

    Args:
        vocab_size: tokenizer vocabulary (``CharTokenizer.vocab_size``).
        width: transformer width D.
        embed_dim: output embedding size E (shared with the image tower).
        layers: transformer blocks (0: mean-pooled character embeddings through the MLP only).
        heads: attention heads.
        max_len: the longest token sequence (learned positions).
    """

    def __init__(self, vocab_size: int, width: int, embed_dim: int, layers: int = 1, heads: int = 4, max_len: int = 32):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width, padding_idx=PAD)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))
        nn.init.normal_(self.pos, std=0.02)
        # dropout 0: the tower must be a deterministic function for the cache and the tests.
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False) if layers > 0 else None
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B, L) int64 -> (B, E) L2-normalised."""
        keep = ids != PAD  # (B, L)
        h = self.tok(ids) + self.pos[:, : ids.shape[1]]  # (B, L, D)
        if self.blocks is not None:
            h = self.blocks(h, src_key_padding_mask=~keep)
        h = self.norm(h)
        # Mean over real characters only: padding length must not change a title's embedding.
        w = keep.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, D)
        return F.normalize(self.proj(pooled), dim=-1)
