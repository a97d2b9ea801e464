"""DESIGN.md §4, "joint image-representation": one diffusion over (image, r) against the image-only
baseline (README.md beside this file).

The vector ``r`` is the frozen multi-tower encoder's embedding (trained on the train split, cached
in ``<eval.cache_dir>/encoder_<hash>``), PCA-reduced and whitened on train, written as
``train.<name>``/``val.<name>`` into ``<out_dir>/representation/vectors.safetensors``; every arm
with a representation modality gets that file as ``data.extra_file`` (an absolute path), so its
batches carry ``r`` and the arm folder evaluates and samples on its own.

Metrics: ``joint_representation_cosine``: cos(generated r̂, the encoder's reading of the generated
image); ``representation_to_image/cosine`` and ``/recall@K``: images generated from val vectors,
read by the encoder, scored against the conditioning vector and by whether the nearest
train-gallery items share the val item's class (:func:`unidiff.metrics.recall_at_k`);
``image_to_<m>/cosine`` comes from :func:`unidiff.evaluate.evaluate`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from unidiff import metrics as M
from unidiff.data import InMemoryDataset, save_extra_file
from unidiff.encoders import EncoderConfig, PCAWhitener, encode_images, train_encoder
from unidiff.errors import ConfigError, DataError
from unidiff.io import write_text

from ..setting import Setting, generate, known_values, modality_index, register


def representation_dim(spec: DictConfig) -> int:
    """The dimension of ``r``: the PCA components kept, else the encoder's embedding size."""
    if spec.representation.pca_dim is not None:
        return int(spec.representation.pca_dim)
    return int(EncoderConfig(**OmegaConf.to_container(spec.representation.encoder)).embed_dim)


def vectors_path(out_dir: Path) -> Path:
    """``<out_dir>/representation/vectors.safetensors`` as an absolute path: it goes into the arms'
    configs, and ``unidiff evaluate``/``sample`` on an arm folder may run from any directory."""
    return Path(os.path.abspath(Path(out_dir) / "representation" / "vectors.safetensors"))


def with_representation_file(exp) -> Dict[str, DictConfig]:
    """The arms' configs, those with a representation modality pointing ``data.extra_file`` at the
    experiment's vectors (:func:`vectors_path`), so their batches carry ``r``. Applied by the runner
    after it has written the file, last (no override undoes it); :func:`experiments.load_experiment`
    leaves it out, its configs being buildable before anything exists. The other arms read no ``r``."""
    path = str(vectors_path(exp.out_dir))
    return {arm: (OmegaConf.merge(cfg, {"data": {"extra_file": path}})
                  if modality_index(cfg, "representation") is not None else cfg)
            for arm, cfg in exp.arms.items()}


def _in_memory(ds, what: str) -> InMemoryDataset:
    if not isinstance(ds, InMemoryDataset):
        raise DataError(f"setting joint_image_representation needs the {what} split in memory (set data.in_memory=true)")
    return ds


@dataclass
class RepresentationData:
    """The frozen encoder, the PCA, and ``r`` for every train/val item."""

    encoder: Any
    pca: Any  # PCAWhitener or None
    vectors: Dict[str, torch.Tensor]  # split -> (N, dim) float32
    embeddings: Dict[str, torch.Tensor]  # split -> (N, E) raw encoder embeddings (retrieval gallery)
    fingerprints: Dict[str, str]
    info: Dict[str, Any]

    def read(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The encoder's reading of images (N, C, H, W): (raw embedding (N, E), r (N, dim))."""
        emb = encode_images(self.encoder, images)
        return emb, (self.pca.transform(emb) if self.pca is not None else emb)


def prepare_representation(spec: DictConfig, cfg: DictConfig, train_set, val_set, info, out_dir: Path,
                           keys: Sequence[str] = ("representation",)) -> RepresentationData:
    """Train (or load from the cache) the multi-tower encoder on the train split, fit the PCA on the
    train embeddings, and compute ``r`` for both splits; saves ``pca.safetensors``, ``encoder.json``
    and ``vectors.safetensors`` under ``out_dir``. The last is a ``data.extra_file``: ``r`` as
    ``train.<key>``/``val.<key>`` for every ``key`` in ``keys`` (the arms' representation modality
    names), stamped with the splits' fingerprints so it is refused for other data."""
    train_set, val_set = _in_memory(train_set, "train"), _in_memory(val_set, "val")
    if info.num_classes < 2:
        raise DataError(f"setting joint_image_representation needs class-labelled data (the encoder's titles are class "
                        f"names); dataset {info.name!r} has {info.num_classes} class(es)")
    rep = spec.representation
    enc_cfg = EncoderConfig(**OmegaConf.to_container(rep.encoder))
    fp = {"train": train_set.fingerprint(), "val": val_set.fingerprint()}
    key = hashlib.sha256(json.dumps({"encoder": enc_cfg.cache_key(), **fp}, sort_keys=True).encode()).hexdigest()[:16]
    enc_cfg = replace(enc_cfg, out_dir=str(Path(cfg.eval.cache_dir) / f"encoder_{key}"))
    encoder, enc_metrics = train_encoder(enc_cfg, train_set.images.cpu(), train_set.labels.cpu(), info.class_names,
                                         val_set.images.cpu(), val_set.labels.cpu())
    emb = {s: encode_images(encoder, ds.images.cpu()) for s, ds in (("train", train_set), ("val", val_set))}
    pca = None
    if rep.pca_dim is not None:
        pca = PCAWhitener().fit(emb["train"], dim=int(rep.pca_dim), whiten=bool(rep.whiten))
    vectors = {s: (pca.transform(e) if pca is not None else e).float().contiguous() for s, e in emb.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    if pca is not None:
        pca.save(out_dir / "pca.safetensors")
    save_extra_file(out_dir / "vectors.safetensors", {s: {k: v for k in keys} for s, v in vectors.items()}, fp)
    summary = {
        "encoder_dir": enc_cfg.out_dir,
        "cached": bool(enc_metrics.get("cached", False)),
        "encoder_val_recall": {k: v for k, v in enc_metrics.items() if k.startswith("recall@")},
        "embed_dim": int(emb["train"].shape[1]),
        "dim": int(vectors["train"].shape[1]),
        "pca_explained_variance_ratio": (float(pca.explained_variance.sum() / emb["train"].double().var(0).sum())
                                         if pca is not None else None),
    }
    write_text(out_dir / "encoder.json", json.dumps(summary, indent=1))
    return RepresentationData(encoder, pca, vectors, emb, fp, summary)


@register
class JointImageRepresentation(Setting):
    name = "joint_image_representation"
    kind = "representation"
    scores_joint_samples = True

    def configure_arm(self, sections):
        # The modality's dim is the representation's: filled from the spec, or checked against it.
        i = next((i for i, m in enumerate(sections["modalities"]) if m["kind"] == self.kind), None)
        if i is None:
            return
        dim, options = representation_dim(self.spec), sections["modalities"][i]["options"]
        if options.get("dim") is None:
            options["dim"] = dim
        elif int(options["dim"]) != dim:
            raise ConfigError(f"modalities[{i}].options.dim: {options['dim']} disagrees with the representation's "
                              f"dimension {dim} (experiment.representation.pca_dim, or the encoder's embed_dim without PCA)")

    def prepare(self, exp, ctx, owner):
        names = sorted({c.modalities[i].name for c in exp.arms.values() if (i := modality_index(c, self.kind)) is not None})
        self.rep = prepare_representation(self.spec, owner, ctx.train_set, ctx.val_set, ctx.info,
                                          vectors_path(exp.out_dir).parent, names)
        ctx.inputs["representation"] = self.rep.vectors["val"][:len(ctx.val_images)]
        # The ceiling of the retrieval metric: the same Recall@K for the real val images.
        recall = M.recall_at_k(self.rep.embeddings["val"], ctx.val_set.labels.cpu(), self.rep.embeddings["train"],
                               ctx.train_set.labels.cpu(), ks=list(self.spec.recall_k))
        ctx.reference.update({f"real_val_{k}": v for k, v in recall.items()})
        ctx.reference.update({f"encoder_{k}": v for k, v in self.rep.info["encoder_val_recall"].items()})
        ctx.reference["representation_dim"] = self.rep.info["dim"]

    def arm_configs(self, exp):
        return with_representation_file(exp)

    def joint_metrics(self, images, aux):
        _, r_img = self.rep.read(images)
        return {"joint_representation_cosine": M.cosine(aux, r_img)}

    def conditional_metrics(self, model, schedule, cfg, ctx, device, name, gen):
        if name is None:
            return {}, []
        r = ctx.inputs["representation"]
        images, _ = generate(model, schedule, cfg, "representation_to_image", len(r), gen(2),
                             known_values(name, r, device), cfg.eval.guidance)
        emb, r_img = self.rep.read(images)
        out = {"representation_to_image/cosine": M.cosine(r_img, r)}
        recall = M.recall_at_k(emb, ctx.val_labels, self.rep.embeddings["train"], ctx.train_set.labels.cpu(),
                               ks=list(self.spec.recall_k))
        out.update({f"representation_to_image/{k}": v for k, v in recall.items()})
        return out, [("representation→image (val r)", images[:int(self.spec.grid)])]

    def rows(self, m):
        return ([("joint_representation_cosine", "joint samples: cos(r̂, encoder(image))", "higher"),
                 ("representation_to_image/cosine", "r→image: cos(r, encoder(image))", "higher")]
                + [(f"representation_to_image/recall@{k}", f"r→image retrieval Recall@{k} (train gallery)", "higher")
                   for k in self.spec.recall_k]
                + [(f"image_to_{m}/cosine", "image→r cosine (val)", "higher"),
                   (f"image_to_{m}/mse", "image→r MSE (val)", "lower")])
