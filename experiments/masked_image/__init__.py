"""DESIGN.md §4, "masked-image training": the masked image (x0 ⊙ M, M) as the auxiliary modality,
against the image-only baseline (README.md beside this file).

``inpaint/masked_mse`` and ``/masked_psnr`` on the val items, with fixed random patch masks that
are the same for every arm: the multi-task model conditions through the drift (§3); an arm without
any auxiliary modality inpaints by replacement (:func:`unidiff.diffusion.replacement_inpaint`), the
standard way an unconditional model inpaints. ``image_to_<m>/masked_mse`` (the head's own
reconstruction) comes from :func:`unidiff.evaluate.evaluate`.

``experiment.mask_ratios`` adds the constrained-inpainting sweep: at each masked fraction ρ (fixed
masks of that ρ on the same val items, the same in every arm) ``sweep@<ρ>/masked_mse`` (the
completion) and ``sweep@<ρ>/visible_mse`` (how far the sample strays from the pixels it was given).
Replacement pastes the visible pixels back, so its visible error is 0 by construction; the drift
sampler is only steered toward them, and the number says how well.
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
        for k, ratio in enumerate(self.spec.mask_ratios):  # the sweep: one fixed mask set per ρ
            mod.mask_ratio = float(ratio)  # random_mask reads ρ from here
            g = torch.Generator().manual_seed(metric_seed(next(iter(exp.arms.values())), 100 + k))
            ctx.inputs[f"mask@{ratio:g}"] = mod.random_mask(len(ctx.val_images), torch.device("cpu"), g)

    @staticmethod
    def _inpaint(model, schedule, cfg, name, x, mask, device, generator):
        """Completions of ``x`` (n, C, H, W) seeing ``mask`` (n, 1, H, W): (images, "drift" | "replacement")."""
        n = len(x)
        if name is not None:  # the multi-task model: the masked image drives the drift (§3)
            masked = {"image": x * mask, "mask": mask}

            def known(start, b):
                return {name: {k: v[start:start + b].to(device) for k, v in masked.items()}}

            images, _ = generate(model, schedule, cfg, "inpaint", n, generator, known, cfg.eval.guidance)
            return images, "drift"
        parts = []  # an image-only model: replacement
        for start in range(0, n, cfg.eval.batch_size):
            sl = slice(start, start + cfg.eval.batch_size)
            parts.append(replacement_inpaint(model, schedule, x[sl].to(device), mask[sl].to(device),
                                             cfg.eval.sampler.value, cfg.eval.steps, generator).cpu())
        return torch.cat(parts), "replacement"

    def conditional_metrics(self, model, schedule, cfg, ctx, device, name, gen):
        if name is None and len(model.modalities):
            return {}, []  # another modality, no masked image: neither way applies
        mask, x = ctx.inputs["mask"], ctx.val_images
        images, how = self._inpaint(model, schedule, cfg, name, x, mask, device, gen(2))
        out = {"inpaint/masked_mse": M.masked_mse(images, x, 1 - mask),
               "inpaint/masked_psnr": M.masked_psnr(images, x, 1 - mask),
               "inpaint/method": how}
        for k, ratio in enumerate(self.spec.mask_ratios):
            m = ctx.inputs[f"mask@{ratio:g}"]
            done, _ = self._inpaint(model, schedule, cfg, name, x, m, device, gen(100 + k))
            out[f"sweep@{ratio:g}/masked_mse"] = M.masked_mse(done, x, 1 - m)
            out[f"sweep@{ratio:g}/visible_mse"] = M.masked_mse(done, x, m)
        return out, [(f"inpainted ({how})", images[:int(self.spec.grid)])]

    def rows(self, m):
        return [("inpaint/masked_mse", "inpainting MSE, masked region (val)", "lower"),
                ("inpaint/masked_psnr", "inpainting PSNR dB, masked region (val)", "higher"),
                (f"image_to_{m}/masked_mse", "head reconstruction MSE, masked region (val)", "lower"),
                (f"image_to_{m}/masked_psnr", "head reconstruction PSNR dB, masked region (val)", "higher"),
                *[row for r in self.spec.mask_ratios for row in (
                    (f"sweep@{r:g}/masked_mse", f"inpainting MSE, masked region, ρ={r:g}", "lower"),
                    (f"sweep@{r:g}/visible_mse", f"inpainting MSE, visible pixels, ρ={r:g}", "lower"))]]

    def convergence_rows(self, m):
        return [("fid", "FID (reference-classifier features)", "lower"),
                ("inpaint/masked_mse", "inpainting MSE, masked region (val)", "lower")]
