"""GFCG guider nodes: sockets only; the guidance lives in ``guiders``."""
from __future__ import annotations

from ..classifiers.vocab import resolve_class
from ..guiders.comfy_decode import DECODE_METHODS
from ..guiders.comfy_guider import GFCGGuider
from ..guiders.comfy_patch import GFCGSampleWrapper, patch_model
from ..guiders.config import GFCGConfig, GFCGInputError, check_window
from ..guiders.engine import COMBINE_MODES, resolve_mode
from ._api import ClassifierType, io

REFERENCE_CHOICES = ["deterministic", "stochastic", "fixed"]

DECODE_TOOLTIP = ("How the classifier sees a latent estimate: auto = TAESD where models/vae_approx has the one for "
                  "this model's latents, else the full VAE (the console says which, once); vae = the full VAE "
                  "decoder (exact, slowest); taesd = ComfyUI's tiny TAESD decoder from models/vae_approx (fast, "
                  "approximate); latent_rgb = the latent format's linear preview colours (nearly free, coarse). "
                  "Pixel-space models ignore it.")
RESOLUTION_TOOLTIP = ("Decode a shrunken estimate: 0 = auto, just the size the classifier reads (its own resize "
                      "before the crop, e.g. 240 px of a 512 image for ResNet-50); 1 = full size; 0.5 = half the "
                      "width and height (about 4x cheaper decoding; the classifier resizes to its input size anyway).")


def decode_inputs(default: str = "auto", resolution: float = 0.0):
    """The decode choice inputs shared by the GFCG and the gradient guider nodes."""
    return [io.Combo.Input("decode", options=list(DECODE_METHODS), default=default, optional=True,
                           tooltip=DECODE_TOOLTIP),
            io.Float.Input("decode_resolution", default=resolution, min=0.0, max=1.0, step=0.125, optional=True,
                           tooltip=RESOLUTION_TOOLTIP)]


def _user_error(fn, *args, **kwargs):
    """Run ``fn``; input errors become ValueError with the same message (shown by ComfyUI as is)."""
    try:
        return fn(*args, **kwargs)
    except GFCGInputError as e:
        raise ValueError(str(e)) from None


def _check_class_spec(name: str, value: str, required: bool) -> str | bool:
    if value is None:   # fed by a link (e.g. ImageNet Class): ComfyUI validates it before it exists
        return True
    v = value.strip()
    if not v:
        return f"{name}: give a class name (e.g. 'golden retriever') or an index" if required else True
    if v.lstrip("-").isdigit() and int(v) < 0:
        return f"{name}: class index {v} must be >= 0"
    return True


def gfcg_setting_inputs():
    """The GFCG settings shared by the GFCG Guider and the GFCG Model Patch (required inputs)."""
    return [
        io.String.Input("desired_class", default="golden retriever",
                        tooltip="The class you want, by name in the classifier's vocabulary (e.g. 'golden "
                                "retriever', any comma-separated synonym) or by index (e.g. '207')."),
        io.Float.Input("tau", default=0.5, min=0.0, max=1.0, step=0.01,
                       tooltip="Confidence threshold: samples with p(desired) >= tau get no guidance; "
                               "0 disables GFCG, 1 guides every sample that is not certain."),
        io.Float.Input("alpha", default=8.0, min=0.0, max=50.0, step=0.05,
                       tooltip="Maximum extra guidance: omega grows from 1 at p = tau to 1 + alpha at p = 0. "
                               "Higher is more precise; on the testbed 8 beats 4 at no worse FD alone and with "
                               "CFG, while with autoguidance 4 keeps FD nearer autoguidance's (the shipped "
                               "autoguidance graphs use 4). Lower it if images break up."),
        io.Float.Input("beta", default=1.0, min=0.01, max=10.0, step=0.05,
                       tooltip="Shape of the ramp (1 - p/tau)^beta: < 1 guides hard just below tau, > 1 "
                               "only when the classifier is very unsure."),
        io.Float.Input("window_start", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Where the classifier starts, as a fraction of the model's noise range like "
                               "ComfyUI's start/end percent (0 = highest noise, 1 = clean); a run split over "
                               "several samplers guides the same steps. 0 = from the start."),
        io.Float.Input("window_end", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Where GFCG stops, as a fraction of the model's noise range (0 = highest noise, "
                               "1 = clean; must be > window_start)."),
        io.Int.Input("period", default=1, min=1, max=1000,
                     tooltip="Run the classifier every `period` steps inside the window; samples keep "
                             "their last decision in between (cheaper; the decision is keyed to sigma, "
                             "so Euler and Heun decide alike)."),
        io.Combo.Input("reference", options=REFERENCE_CHOICES, default="deterministic",
                       tooltip="How the reference class is picked for a confused sample: the classifier's "
                               "runner-up (deterministic), a draw from its other classes seeded by the noise "
                               "seed (stochastic), or the fixed_reference_class."),
    ]


def gfcg_optional_inputs():
    """The optional inputs shared by the GFCG Guider and the GFCG Model Patch."""
    return [
        io.Vae.Input("vae", optional=True,
                     tooltip="The model's VAE, to show the classifier pixels. Needed for latent models; "
                             "leave empty for pixel-space models."),
        io.Clip.Input("clip", optional=True,
                      tooltip="Text models: the CLIP that encodes the reference prompt (prompt_template with "
                              "the reference class name). Class-label models need none."),
        io.String.Input("prompt_template", default="a photo of a {}", optional=True,
                        tooltip="Text models: the reference prompt; {} is replaced by the class name. Write "
                                "your positive prompt here with {} where the class goes (e.g. 'a photo of a {} on "
                                "grass'), so that the reference differs from it only in the class. Encodings are "
                                "cached per class."),
        io.String.Input("fixed_reference_class", default="", optional=True,
                        tooltip="For reference = fixed: the class to guide away from (name or index)."),
        io.Combo.Input("classify_input", options=["current", "previous"], default="current", optional=True,
                       tooltip="What the classifier sees: this evaluation's conditional estimate (paper "
                               "order; a second forward for confused samples on classifier steps) or the "
                               "previous evaluation's guided estimate (always one forward)."),
        io.Float.Input("temperature", default=1.0, min=0.01, max=100.0, step=0.01, optional=True,
                       tooltip="Softmax temperature T of the classifier (p = softmax(logits / T)); T > 1 "
                               "flattens p so more samples fall under tau."),
        *decode_inputs(),
        io.Int.Input("settle_after", default=0, min=0, max=1000, optional=True,
                     tooltip="A sample the classifier found confident (p >= tau) on this many classifier steps in "
                             "a row is not decoded or classified again: its decision (no guidance) stands. "
                             "0 = classify every sample on every classifier step."),
    ]


def gfcg_config(names, desired_class, tau, alpha, beta, window_start, window_end, period, reference,
                fixed_reference_class="", classify_input="current", temperature=1.0, settle_after=0) -> GFCGConfig:
    """The GFCGConfig of a node's inputs (class names resolved in the classifier's vocabulary)."""
    if reference not in REFERENCE_CHOICES:
        raise ValueError(f"reference: {reference!r} is not one of {REFERENCE_CHOICES}")
    desired = _user_error(resolve_class, desired_class, names, "desired_class")
    fixed = None
    if reference == "fixed":
        fixed = _user_error(resolve_class, fixed_reference_class, names, "fixed_reference_class")
    return _user_error(GFCGConfig, desired_class=desired, tau=tau, alpha=alpha, beta=beta, window_start=window_start,
                       window_end=window_end, period=period, reference_mode=reference, fixed_reference=fixed,
                       classify_input=classify_input, temperature=temperature, settle_after=settle_after)



class GFCGGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GFCGGuider",
            display_name="GFCG Guider",
            category="sampling/gfcg",
            description="Gradient-Free Classifier Guidance (arXiv 2411.15393) as a GUIDER for SamplerCustomAdvanced. "
                        "At chosen steps a classifier looks at the denoised estimate; when it is not confident in the "
                        "desired class (p < tau) the sample is pushed away from the model's prediction for a reference "
                        "class (the classifier's runner-up) with scale omega = 1 + alpha (1 - p/tau)^beta. Confident "
                        "samples are left alone and cost nothing extra. Stack with CFG or autoguidance with the GFCG "
                        "Combiner.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model."),
                io.Conditioning.Input("positive", tooltip="Your prompt (text models) or class label (class-label "
                                                          "models); the conditional branch D1."),
                ClassifierType.Input("classifier", tooltip="Image classifier from Load Image Classifier."),
                *gfcg_setting_inputs(),
                *gfcg_optional_inputs(),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced, or to the GFCG Combiner.")],
        )

    @classmethod
    def validate_inputs(cls, window_start, window_end, desired_class):
        try:
            check_window(float(window_start), float(window_end))
        except GFCGInputError as e:
            return str(e)
        return _check_class_spec("desired_class", desired_class, True)

    @classmethod
    def execute(cls, model, positive, classifier, desired_class, tau, alpha, beta, window_start, window_end, period,
                reference, vae=None, clip=None, prompt_template="a photo of a {}", fixed_reference_class="",
                classify_input="current", temperature=1.0, settle_after=0, decode="auto",
                decode_resolution=0.0) -> io.NodeOutput:
        config = gfcg_config(classifier.class_names, desired_class, tau, alpha, beta, window_start, window_end, period,
                             reference, fixed_reference_class, classify_input, temperature, settle_after)
        guider = _user_error(GFCGGuider, model, config, classifier, positive, vae=vae, clip=clip,
                             prompt_template=prompt_template, decode=decode, decode_resolution=decode_resolution)
        return io.NodeOutput(guider)


class GFCGCombinerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GFCGCombiner",
            display_name="GFCG Combiner",
            category="sampling/gfcg",
            description="Stacks a GFCG Guider with CFG (negative conditioning + scale) or with autoguidance (a weaker "
                        "guide model + weight). additive: D1 + (w-1)(D1 - D_neg or G) + (omega-1)(D1 - D_ref). swap: "
                        "a confused sample's negative / guide branch is replaced by its reference class (no extra "
                        "model evaluation) with scale w + omega - 1.",
            inputs=[
                io.Guider.Input("gfcg", tooltip="The GFCG Guider to stack (its settings are kept)."),
                io.Combo.Input("combine_with", options=["cfg", "autoguidance"], default="cfg",
                               tooltip="cfg: classifier-free guidance with the negative conditioning; autoguidance: "
                                       "guidance by a weaker guide model (EDM2 presets: xs guides s, m guides xxl)."),
                io.Combo.Input("mode", options=list(COMBINE_MODES), default="auto",
                               tooltip="auto: swap with autoguidance, additive with CFG. additive: GFCG's reference "
                                       "term is added (one more branch for confused samples). swap: confused samples "
                                       "use the reference class in place of the negative / guide branch, so the cost "
                                       "stays that of CFG / autoguidance; with CFG their negative prompt is then not "
                                       "used, which is why auto keeps additive there. On the pack's testbed swap beat "
                                       "additive on autoguidance and tied it on CFG (docs/testbed.md)."),
                io.Float.Input("scale", default=5.0, min=0.0, max=100.0, step=0.05, round=0.01,
                               tooltip="w: the CFG scale, or the autoguidance weight (1 = off)."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative conditioning, for combine_with = cfg."),
                io.Model.Input("guide_model", optional=True,
                               tooltip="The weaker guide model, for combine_with = autoguidance (a different network "
                                       "of the same family and latent space)."),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, gfcg, combine_with, mode, scale, negative=None, guide_model=None) -> io.NodeOutput:
        if not isinstance(gfcg, GFCGGuider):
            raise ValueError(f"gfcg: expected the output of a GFCG Guider node, got {type(gfcg).__name__}")
        combine = "cfg" if combine_with == "cfg" else "atg"
        if mode not in COMBINE_MODES:
            raise ValueError(f"mode: {mode!r} is not one of {list(COMBINE_MODES)}")
        guider = _user_error(gfcg.combined, combine, resolve_mode(combine, mode), scale, negative=negative,
                             guide_patcher=guide_model)
        return io.NodeOutput(guider)


class GFCGModelPatchNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GFCGModelPatch",
            display_name="GFCG Model Patch (KSampler)",
            category="sampling/gfcg",
            description="GFCG for the plain KSampler and KSamplerAdvanced: patches the MODEL so that sampling it runs "
                        "GFCG with the sampler's own positive, negative and cfg -- GFCG alone at cfg 1, GFCG stacked on "
                        "CFG (mode additive or swap) otherwise. Same settings, same result as the GFCG Guider (+ GFCG "
                        "Combiner with cfg) on SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch; connect the output to KSampler."),
                ClassifierType.Input("classifier", tooltip="Image classifier from a classifier loader."),
                *gfcg_setting_inputs(),
                io.Combo.Input("mode", options=["additive", "swap"], default="additive", optional=True,
                               tooltip="With the KSampler's cfg > 1: additive adds GFCG's reference term to CFG; swap "
                                       "replaces a confused sample's negative branch by its reference class."),
                *gfcg_optional_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The patched model, for KSampler / KSamplerAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, window_start, window_end, desired_class):
        return GFCGGuiderNode.validate_inputs(window_start, window_end, desired_class)

    @classmethod
    def execute(cls, model, classifier, desired_class, tau, alpha, beta, window_start, window_end, period, reference,
                mode="additive", vae=None, clip=None, prompt_template="a photo of a {}", fixed_reference_class="",
                classify_input="current", temperature=1.0, settle_after=0, decode="auto",
                decode_resolution=0.0) -> io.NodeOutput:
        config = gfcg_config(classifier.class_names, desired_class, tau, alpha, beta, window_start, window_end, period,
                             reference, fixed_reference_class, classify_input, temperature, settle_after)
        wrapper = GFCGSampleWrapper(config, classifier, vae=vae, clip=clip, prompt_template=prompt_template, mode=mode,
                                    decode=decode, decode_resolution=decode_resolution)
        return io.NodeOutput(patch_model(model, wrapper))
