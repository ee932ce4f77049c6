"""The trace plot node: sockets only; the drawing lives in ``guiders.trace_plot``."""
from __future__ import annotations

import torch

import comfy.patcher_extension

from ..guiders.comfy_gradient import ClassifierGuidanceGuider
from ..guiders.comfy_guider import GFCGGuider
from ..guiders.comfy_patch import WRAPPER_KEY
from ..guiders.trace_plot import plot_trace
from ._api import io


class GuidanceTracePlot(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GFCGTracePlot",
            display_name="GFCG Trace Plot",
            category="sampling/gfcg",
            description="Draws what the classifier saw during the last sampling run of a GFCG Guider (or Combiner, or "
                        "the gradient classifier guider): p(desired class) per sample at each classifier step, and "
                        "GFCG's scale omega with the reference class each confused sample was pushed away from (the "
                        "gradient guider: its weight per step). Connect the sampler's output to `samples` so the plot "
                        "is drawn after sampling; send the IMAGE to Preview Image or Save Image.",
            inputs=[
                io.Latent.Input("samples", tooltip="The sampler's output: only orders this node after the sampler."),
                io.Guider.Input("guider", optional=True,
                                tooltip="The guider that the sampler used (GFCG Guider, GFCG Combiner or Classifier "
                                        "Guidance). Give this or model."),
                io.Model.Input("model", optional=True,
                               tooltip="For KSampler: the model from GFCG Model Patch that the sampler used."),
                io.Int.Input("width", default=1000, min=320, max=4096, step=10, optional=True,
                             tooltip="Width of the plot image in pixels."),
                io.Int.Input("height", default=560, min=240, max=4096, step=10, optional=True,
                             tooltip="Height of the plot image in pixels."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The plot, for Preview Image or Save Image.")],
        )

    @classmethod
    def execute(cls, samples, guider=None, model=None, width=1000, height=560) -> io.NodeOutput:
        if guider is None and model is not None:
            wrappers = model.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
            if not wrappers:
                raise ValueError("model: this model carries no GFCG Model Patch")
            guider = wrappers[0].last_guider
            if guider is None:
                raise ValueError("model: the patched model has not been sampled yet; connect the KSampler's LATENT to "
                                 "samples")
        if isinstance(guider, GFCGGuider):
            c = guider.engine.config
            desired, tau, title = c.desired_class, c.tau, f"GFCG ({guider.classifier.classifier.name})"
        elif isinstance(guider, ClassifierGuidanceGuider):
            desired, tau, title = guider.config.desired_class, None, "gradient classifier guidance"
        elif guider is None:
            raise ValueError("guider: connect the guider the sampler used (or, for KSampler, the patched model)")
        else:
            raise ValueError(f"guider: expected a GFCG Guider, GFCG Combiner or Classifier Guidance output, got "
                             f"{type(guider).__name__}")
        img = plot_trace(guider.engine.trace, guider.classifier.class_names, desired, tau, title, width, height)
        return io.NodeOutput(torch.from_numpy(img).float().div(255.0).unsqueeze(0))
