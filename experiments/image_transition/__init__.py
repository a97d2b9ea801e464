"""DESIGN.md §4, "image transition": (source, target) pairs, the source a built-in view of the
target, against the image-only and source→target-only baselines (README.md beside this file).

``transition/mse`` and ``/psnr``: targets generated from the val sources against the true targets;
``pair_consistency_mse``: for joint samples, the MSE between the generated source and the built-in
transform of the generated target. ``image_to_<m>/mse`` and ``/psnr`` (target→source, the head)
come from :func:`unidiff.evaluate.evaluate`.
"""

from __future__ import annotations

from unidiff import metrics as M

from ..setting import Setting, generate, known_values, register, standalone_modality


@register
class ImageTransition(Setting):
    name = "image_transition"
    kind = "source_image"
    scores_joint_samples = True

    def prepare(self, exp, ctx, owner):
        # The source modality's make_source is the built-in view: the val sources, and the
        # pair-consistency judge of the joint samples.
        self.source_view = standalone_modality(owner, self.kind, ctx.info.image_shape)
        ctx.inputs["source"] = self.source_view.make_source(ctx.val_images).float()
        ctx.data_panels.append(("val sources", ctx.inputs["source"][:ctx.grid]))

    def joint_metrics(self, images, aux):
        return {"pair_consistency_mse": M.mse(aux.clamp(-1, 1), self.source_view.make_source(images).float())}

    def conditional_metrics(self, model, schedule, cfg, ctx, device, name, gen):
        if name is None:
            return {}, []
        src, x = ctx.inputs["source"], ctx.val_images
        images, _ = generate(model, schedule, cfg, "transition", len(x), gen(2), known_values(name, src, device),
                             cfg.eval.guidance)
        return ({"transition/mse": M.mse(images, x), "transition/psnr": M.psnr(images, x)},
                [("source→target (val sources)", images[:int(self.spec.grid)])])

    def rows(self, m):
        return [("transition/mse", "source→target MSE (val)", "lower"),
                ("transition/psnr", "source→target PSNR dB (val)", "higher"),
                (f"image_to_{m}/mse", "target→source MSE, head (val)", "lower"),
                (f"image_to_{m}/psnr", "target→source PSNR dB, head (val)", "higher"),
                ("pair_consistency_mse", "joint pairs: MSE(source, transform(target))", "lower")]
