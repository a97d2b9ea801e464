"""The paper's strongest claim: class-conditional diffusion converges faster *with* the
masked-image modality than without it (README.md beside this file).

Arms share the backbone, steps and seed set and differ in the modality list only: ``label_masked``
(label + masked image) against ``label`` (label alone); an unconditional pair (masked image alone
against no modality) is the control where the paper expects no gain. With ``experiment.eval_at``
every arm is evaluated at several checkpoints (:mod:`experiments.runner`), so the table shows the
convergence, not one end point.

Beside :func:`unidiff.evaluate.evaluate`'s numbers (``fid`` of joint samples, ``class_conditional_accuracy``),
the setting scores ``experiment.n_fid`` class→image samples (classes cycled, drift guidance
``eval.guidance``) in the reference classifier's features against the ``eval.reference`` split:

- ``c2i/fid``, ``c2i/accuracy``: the modalities that are not given (the masked image) enter the
  drift through their heads' predictions, the sampler's ``Â`` (DESIGN.md §3);
- ``c2i_null/fid``, ``c2i_null/accuracy`` (``null_encoding`` in ``experiment.unknown_drift``): they enter
  as their null encodings ``E(∅)`` instead, the sampler's ``sample(unknown_drift="null_encoding")``
  (DESIGN.md §3.3). Only arms with a modality besides the label have it: with the label alone both
  are the same chain.
"""

from __future__ import annotations

from typing import Dict

import torch

from unidiff import metrics as M

from ..setting import Setting, generate, known_values, register

DRIFT_PREFIX = {"predicted": "c2i", "null_encoding": "c2i_null"}


@register
class MaskedClassConditional(Setting):
    name = "masked_class_conditional"
    kind = "label"

    def prepare(self, exp, ctx, owner):
        ev = owner.eval
        clf, acc = M.get_reference_classifier(ctx.train_set, ctx.val_set, ctx.info, ev.cache_dir,
                                              steps=ev.reference_steps)  # the judge evaluate() uses (cached)
        self.classifier = clf.cpu().eval()
        feats = M.ClassifierFeatures(self.classifier)
        reference = ctx.train_set if ev.reference == "train" else ctx.val_set
        self.reference = M.reference_statistics(reference, feats, ev.cache_dir, int(ev.batch_size), keep=0)
        k = int(ctx.info.num_classes)
        ctx.inputs["c2i_labels"] = torch.arange(int(self.spec.n_fid)) % k  # (n_fid,) classes cycled: balanced
        ctx.reference.update({"c2i_n_samples": int(self.spec.n_fid), "c2i_reference_items": int(self.reference.n)})

    @torch.no_grad()
    def _score(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Dict[str, float]:
        feats = M.ClassifierFeatures(self.classifier)
        stats = M.FeatureStats.from_features(M.extract_features(images, feats, batch_size)["features"], keep=0)
        pred = torch.cat([self.classifier(x).argmax(-1) for x in images.split(batch_size)])
        return {"fid": M.frechet_distance(self.reference, stats), "accuracy": float((pred == labels).float().mean())}

    def conditional_metrics(self, model, schedule, cfg, ctx, device, name, gen):
        if name is None:
            return {}, []  # no label: the unconditional control arms (evaluate's FID only)
        labels = ctx.inputs["c2i_labels"]
        others = [n for n in model.modalities if n != name]
        out, panels = {}, []
        for k, drift in enumerate(self.spec.unknown_drift):
            if drift == "null_encoding" and not others:
                continue  # nothing unknown: the same chain as "predicted"
            images, _ = generate(model, schedule, cfg, "class_to_image", len(labels), gen(3 + k),
                                 known_values(name, labels, device), cfg.eval.guidance, unknown_drift=drift)
            prefix = DRIFT_PREFIX[drift]
            out.update({f"{prefix}/{key}": v for key, v in self._score(images, labels, int(cfg.eval.batch_size)).items()})
            out[f"{prefix}/n_samples"] = len(labels)
            panels.append((f"class→image ({drift} drift)", images[:int(self.spec.grid)]))
        return out, panels

    def rows(self, m):
        n = int(self.spec.n_fid)
        return [("c2i/fid", f"class→image FID (Â drift for the rest), n={n}", "lower"),
                ("c2i/accuracy", "class→image accuracy (Â drift for the rest)", "higher"),
                ("c2i_null/fid", f"class→image FID (E(∅) for the rest), n={n}", "lower"),
                ("c2i_null/accuracy", "class→image accuracy (E(∅) for the rest)", "higher"),
                ("class_conditional_accuracy", "class→image accuracy (evaluate, eval.n_samples)", "higher"),
                ("label_accuracy", "image→label accuracy (val)", "higher")]

    def convergence_rows(self, m):
        n = int(self.spec.n_fid)
        return [("c2i/fid", f"class→image FID, n={n}", "lower"),
                ("c2i/accuracy", "class→image accuracy", "higher"),
                ("fid", "joint-sample FID (reference-classifier features)", "lower")]
