"""Off-the-shelf gradient classifier guidance node: sockets only; the guidance lives in ``guiders``."""
from __future__ import annotations

import math

from ..classifiers.vocab import resolve_class
from ..guiders.comfy_gradient import ClassifierGuidanceGuider
from ..guiders.gradient import CLASSIFIER_INPUTS, CGConfig
from ._api import ClassifierType, io
from .guider_nodes import _check_class_spec, _user_error, decode_inputs

class ClassifierGuidanceNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GFCGClassifierGuidance",
            display_name="Classifier Guidance (off-the-shelf, gradient)",
            category="sampling/gfcg",
            description="Gradient classifier guidance with an ordinary (off-the-shelf) classifier, made to work by the "
                        "pre-conditioning of EluCD (arXiv 2310.11311): the classifier sees the denoised estimate, its "
                        "ReLUs become Softplus(beta), the gradient of tau1 f_y - logsumexp(tau2 f) is RMS-normalised and "
                        "weighted by a decaying schedule with a sine bump, and added to the denoised estimate so every "
                        "sampler works. Needs a backward pass through the classifier (and the decoder, for latent "
                        "models) at every evaluation: the cost GFCG avoids. Stacks with CFG through cfg + negative.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model."),
                io.Conditioning.Input("positive", tooltip="Your prompt or class label: the conditional branch."),
                ClassifierType.Input("classifier", tooltip="Image classifier from a classifier loader; a differentiable "
                                                           "copy with Softplus is made for each run."),
                io.String.Input("desired_class", default="golden retriever",
                                tooltip="The class whose score is raised: a name in the classifier's vocabulary or an "
                                        "index."),
                io.Float.Input("scale", default=0.004, min=0.0, max=10.0, step=0.001, round=0.0001,
                               tooltip="s: the displacement per step at the first step, as a fraction of the current "
                                       "sample's RMS (official EDM script: 0.004 at 10 steps; 0 = off)."),
                io.Float.Input("gamma", default=0.3, min=0.0, max=10.0, step=0.05,
                               tooltip="Sine bump: w_i = s((N+1-i)/(N+1) + gamma sin(pi i / N)); 0 = linear decay only."),
                io.Float.Input("softplus_beta", default=5.0, min=0.0, max=100.0, step=0.5,
                               tooltip="Every ReLU of the classifier becomes Softplus(beta) (smoother gradients); "
                                       "0 keeps the ReLUs. Official: 5 (EDM), 3 (DDPM)."),
                io.Float.Input("tau1", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Joint temperature tau1 in tau1 f_y - logsumexp(tau2 f). With RMS normalisation "
                                       "only the ratio tau2 / tau1 matters."),
                io.Float.Input("tau2", default=0.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Marginal temperature: tau2 = tau1 is ordinary conditional guidance (log "
                                       "softmax), 0 guides by the bare logit (official EDM), in between is EluCD's "
                                       "joint guidance (official DDPM: 0.5)."),
                io.Combo.Input("classifier_input", options=list(CLASSIFIER_INPUTS), default="denoised",
                               tooltip="denoised: the classifier sees the denoised estimate (the paper); noisy: the "
                                       "noisy sample scaled to RMS <= 1 (the official EDM code)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale under the classifier guidance; 1 = none (no negative branch)."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative conditioning, for cfg != 1."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The model's VAE, for latent models (the gradient flows back through its "
                                     "decoder, or through TAESD / the preview colours; see decode)."),
                *decode_inputs(),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, desired_class):
        return _check_class_spec("desired_class", desired_class, True)

    @classmethod
    def execute(cls, model, positive, classifier, desired_class, scale, gamma, softplus_beta, tau1, tau2,
                classifier_input, cfg, negative=None, vae=None, decode="auto", decode_resolution=0.0) -> io.NodeOutput:
        desired = _user_error(resolve_class, desired_class, classifier.class_names, "desired_class")
        beta = math.inf if softplus_beta == 0 else float(softplus_beta)
        config = _user_error(CGConfig, desired_class=desired, scale=scale, gamma=gamma, softplus_beta=beta, tau1=tau1,
                             tau2=tau2, classifier_input=classifier_input)
        guider = _user_error(ClassifierGuidanceGuider, model, config, classifier, positive, negative=negative,
                             cfg=float(cfg), vae=vae, decode=decode, decode_resolution=decode_resolution)
        return io.NodeOutput(guider)
