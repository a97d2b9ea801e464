"""DESIGN.md §4, "masked-image training": the masked image (x0 ⊙ M, M) as the auxiliary modality,
against the image-only baseline (README.md beside this file).

``inpaint/masked_mse`` and ``/masked_psnr`` on the val items, with fixed random patch masks that
are the same for every arm: the multi-task model conditions through the drift (§3); an arm without
any auxiliary modality inpaints by replacement (:func:`unidiff.diffusion.replacement_inpaint`), the
standard way an unconditional model inpaints. ``image_to_<m>/masked_mse`` (the head's own
reconstruction) comes from :func:`unidiff.evaluate.evaluate`.
"""

from __future__ import annotations

import torch

from unidiff import metrics as M
from unidiff.diffusion import replacement_inpaint

from ..setting import Setting, generate, metric_seed, register, standalone_modality


@register
class MaskedImage(Setting):
    name = "masked_image"
    kind = "masked_image"

    def prepare(self, exp, ctx, owner):
        mod = standalone_modality(owner, self.kind, ctx.info.image_shape)
        gen = torch.Generator().manual_seed(metric_seed(next(iter(exp.arms.values())), 0))
        mask = mod.random_mask(len(ctx.val_images), torch.device("cpu"), gen)  # (n, 1, H, W), 1 = visible
        ctx.inputs["mask"] = mask
        ctx.data_panels.append(("masked inputs", (ctx.val_images * mask)[:ctx.grid]))

    def conditional_metrics(self, model, schedule, cfg, ctx, device, name, gen):
        if name is None and len(model.modalities):
            return {}, []  # another modality, no masked image: neither way applies
        mask, x, n = ctx.inputs["mask"], ctx.val_images, len(ctx.val_images)
        if name is not None:  # the multi-task model: the masked image drives the drift (§3)
            masked = {"image": x * mask, "mask": mask}

            def known(start, b):
                return {name: {k: v[start:start + b].to(device) for k, v in masked.items()}}

            images, _ = generate(model, schedule, cfg, "inpaint", n, gen(2), known, cfg.eval.guidance)
            how = "drift"
        else:  # an image-only model: replacement
            g2, parts = gen(2), []
            for start in range(0, n, cfg.eval.batch_size):
                sl = slice(start, start + cfg.eval.batch_size)
                parts.append(replacement_inpaint(model, schedule, x[sl].to(device), mask[sl].to(device),
                                                 cfg.eval.sampler.value, cfg.eval.steps, g2).cpu())
            images, how = torch.cat(parts), "replacement"
        out = {"inpaint/masked_mse": M.masked_mse(images, x, 1 - mask),
               "inpaint/masked_psnr": M.masked_psnr(images, x, 1 - mask),
               "inpaint/method": how}
        return out, [(f"inpainted ({how})", images[:int(self.spec.grid)])]

    def rows(self, m):
        return [("inpaint/masked_mse", "inpainting MSE, masked region (val)", "lower"),
                ("inpaint/masked_psnr", "inpainting PSNR dB, masked region (val)", "higher"),
                (f"image_to_{m}/masked_mse", "head reconstruction MSE, masked region (val)", "lower"),
                (f"image_to_{m}/masked_psnr", "head reconstruction PSNR dB, masked region (val)", "higher")]
