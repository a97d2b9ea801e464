"""DESIGN.md §4, "joint image-label": one diffusion over (image, class label) against the
image-only and label-only baselines (README.md beside this file).

Every number comes from :func:`unidiff.evaluate.evaluate` (FID, bits/dim, image→label accuracy,
joint consistency, class→image accuracy); this setting adds the class→image panel of ``samples.png``.
"""

from __future__ import annotations

import torch

from ..setting import Setting, generate, known_values, register


@register
class JointImageLabel(Setting):
    name = "joint_image_label"
    kind = "label"

    def conditional_metrics(self, model, schedule, cfg, ctx, device, name, gen):
        if name is None:
            return {}, []
        grid = int(self.spec.grid)
        cond = torch.arange(grid) % model.modalities[name].num_classes  # (grid,) classes 0, 1, 2, ...
        images, _ = generate(model, schedule, cfg, "class_to_image", grid, gen(2), known_values(name, cond, device),
                             cfg.eval.guidance)
        return {}, [("class→image (classes 0,1,2,...)", images)]

    def rows(self, m):
        return [("label_accuracy", "image→label accuracy (val)", "higher"),
                ("joint_consistency", "joint samples: label = classifier(image)", "higher"),
                ("class_conditional_accuracy", "class→image accuracy (reference classifier)", "higher")]
