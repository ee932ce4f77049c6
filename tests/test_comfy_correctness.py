"""Defects that gave wrong images without any error in ordinary graphs (issue "Correctness"), each
reproduced by a script of the review (../shared/review/) and turned into a test here that failed
on the pack before its fix: per-image class labels, the Model Patch hijacking other guiders,
ComfyUI's CFG hooks (RescaleCFG's sampler_cfg_function, disable_cfg1_optimization) and the
unconditional networks that made GFCG a silent no-op."""
import pytest
import torch

from conftest import node, sample

pytestmark = pytest.mark.comfy

KW = dict(desired_class="3", tau=1.0, alpha=2.0, beta=1.0, window_start=0.0, window_end=1.0, period=1,
          reference="deterministic")


def _labels(*classes, k=None):
    from comfy_models import K

    onehot = torch.zeros(len(classes), k or K)
    onehot[torch.arange(len(classes)), torch.tensor(classes)] = 1.0
    return [[torch.zeros(1, 1, 1), {"class_labels": onehot}]]


def _cfg_guider(model, pos, neg, cfg):
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg)
    g.set_cfg(cfg)
    return g


# ------------------------------------------------------------------ 1. per-image class labels
def test_per_image_class_labels_are_each_rows_desired_class(env):
    """EDM2 Class Label `3;5` gives one label per image, cycled over the batch: every row is judged
    by its own class (review: multi.py), in the GFCG guider and the gradient guider."""
    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos = _labels(3, 5)
    g = node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], **KW)
    sample(g, batch=3, steps=3)
    assert g.engine.desired_rows is not None and g.engine.desired_rows.tolist() == [3, 5, 3]
    assert len(g.engine.trace[0].p_des) == 3
    cg = node(env, "GFCGClassifierGuidance", model=m, positive=pos, classifier=env["clf"], desired_class="3",
              scale=1.0, gamma=0.3, softplus_beta=5.0, tau1=1.0, tau2=0.0, classifier_input="denoised", cfg=1.0)
    sample(cg, batch=4, steps=2)
    assert cg.engine.desired_rows.tolist() == [3, 5, 3, 5]


def test_per_image_classes_match_single_class_runs_row_by_row(env):
    """Row r of a `3;5` batch decides exactly as a run that wants class labels[r] for every row."""
    cm = env["cm"]
    m, _ = cm.tiny_model()
    both = node(env, "GFCGGuider", model=m, positive=_labels(3, 5), classifier=env["clf"], **KW)
    sample(both, batch=2, steps=3, seed=4)
    for row, cls in enumerate((3, 5)):
        single = node(env, "GFCGGuider", model=m, positive=_labels(cls, cls), classifier=env["clf"],
                      **dict(KW, desired_class=str(cls)))
        sample(single, batch=2, steps=3, seed=4)
        # the first decision (before the rows' trajectories differ) judges row r by its own class
        assert both.engine.trace[0].p_des[row] == pytest.approx(single.engine.trace[0].p_des[row], abs=1e-6)


def test_empty_label_row_is_refused(env):
    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos = _labels(3, 5)
    pos[0][1]["class_labels"][1] = 0.0
    g = node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], **KW)
    with pytest.raises(Exception, match="positive: class label row 1 is empty"):
        sample(g, batch=2, steps=2)


# ------------------------------------------------------------------ 2. the patch and other guiders
def test_model_patch_leaves_other_guiders_alone(env):
    """A model carrying GFCG Model Patch, sampled by another guider, gives that guider's result
    (review: patch_other.py): the gradient guider at scale 0, the GFCG Guider at tau = 0 and
    Guider_Basic all equal the plain conditional sample of the unpatched model."""
    from comfy_extras.nodes_custom_sampler import Guider_Basic

    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos = cm.label_cond(3)
    pm = node(env, "GFCGModelPatch", model=m, classifier=env["clf"], **dict(KW, alpha=4.0))
    b = Guider_Basic(m)
    b.set_conds(pos)
    ref = sample(b)
    cg = node(env, "GFCGClassifierGuidance", model=pm, positive=pos, classifier=env["clf"], desired_class="3",
              scale=0.0, gamma=0.3, softplus_beta=5.0, tau1=1.0, tau2=0.0, classifier_input="denoised", cfg=1.0)
    assert torch.equal(sample(cg), ref)
    g = node(env, "GFCGGuider", model=pm, positive=pos, classifier=env["clf"], **dict(KW, tau=0.0))
    assert torch.equal(sample(g), ref)
    bp = Guider_Basic(pm)
    bp.set_conds(pos)
    assert torch.equal(sample(bp), ref)


# ------------------------------------------------------------------ 3. ComfyUI's CFG hooks
def test_tau0_with_rescale_cfg_is_comfyuis_cfg_guider(env):
    """RescaleCFG sets sampler_cfg_function: at tau = 0 the Combiner and the Model Patch equal
    ComfyUI's CFGGuider on the same model, bit for bit (review: rescale.py)."""
    from comfy_extras.nodes_model_advanced import RescaleCFG

    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos, neg = cm.label_cond(3), cm.label_cond(None)
    mr = RescaleCFG().patch(m, 0.7)[0]
    ref = sample(_cfg_guider(mr, pos, neg, 4.0))
    assert not torch.equal(ref, sample(_cfg_guider(m, pos, neg, 4.0)))        # the hook does change CFG
    for mode in ("additive", "swap"):
        comb = node(env, "GFCGCombiner", gfcg=node(env, "GFCGGuider", model=mr, positive=pos, classifier=env["clf"],
                                                   **dict(KW, tau=0.0)),
                    combine_with="cfg", mode=mode, scale=4.0, negative=neg)
        assert torch.equal(sample(comb), ref), mode
    pm = node(env, "GFCGModelPatch", model=mr, classifier=env["clf"], **dict(KW, tau=0.0))
    assert torch.equal(sample(_cfg_guider(pm, pos, neg, 4.0)), ref)
    # and with GFCG active the hook still shapes the CFG part (the result differs from tau = 0)
    pm1 = node(env, "GFCGModelPatch", model=mr, classifier=env["clf"], **dict(KW, tau=1.0, alpha=4.0))
    assert not torch.equal(sample(_cfg_guider(pm1, pos, neg, 4.0)), ref)


@pytest.mark.parametrize("cfg", [1.0, 0.8, 1.5])
def test_tau0_with_cfg_pp_samplers_is_comfyuis(env, cfg):
    """CFG++ samplers set disable_cfg1_optimization (the negative runs at cfg 1) and read the
    negative in a post-CFG hook: at tau = 0 the Model Patch and the Combiner equal ComfyUI
    (review: cfgpp.py)."""
    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos, neg = cm.label_cond(3), cm.label_cond(None)
    ref = sample(_cfg_guider(m, pos, neg, cfg), sampler="euler_cfg_pp", steps=6, batch=2)
    pm = node(env, "GFCGModelPatch", model=m, classifier=env["clf"], **dict(KW, tau=0.0))
    assert torch.equal(sample(_cfg_guider(pm, pos, neg, cfg), sampler="euler_cfg_pp", steps=6, batch=2), ref)
    comb = node(env, "GFCGCombiner", gfcg=node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"],
                                               **dict(KW, tau=0.0)),
                combine_with="cfg", mode="additive", scale=cfg, negative=neg)
    assert torch.equal(sample(comb, sampler="euler_cfg_pp", steps=6, batch=2), ref)


def test_model_patch_at_cfg1_is_gfcg_alone(env):
    """KSampler at cfg 1 skips the negative (ComfyUI's cfg1 optimisation): the patch is GFCG alone,
    in either mode, and the negative is never evaluated."""
    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos, neg = cm.label_cond(3), cm.label_cond(None)
    for mode in ("additive", "swap"):
        pm = node(env, "GFCGModelPatch", model=m, classifier=env["clf"], mode=mode, **KW)
        got = sample(_cfg_guider(pm, pos, neg, 1.0), seed=3)
        alone = sample(node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"], **KW), seed=3)
        assert torch.equal(got, alone), mode


# ------------------------------------------------------------------ 5. unconditional networks
def _uncond_model(env, seed=0, width=16):
    import comfy.model_management
    import comfy.model_patcher

    cm = env["cm"]

    class UncondTiny(cm.TinyModel):
        def extra_conds(self, **kw):   # like EDM2Model with label_dim = 0 (an unconditional net)
            return {}

    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(UncondTiny(cm.TinyNet(seed=seed, width=width)), load_device=dev,
                                            offload_device=dev)


def test_unconditional_main_model_is_refused(env):
    """An unconditional main model drops the label: D_ref = D1, GFCG did nothing (review:
    uncond_main.py). Refused, naming the input."""
    um = _uncond_model(env)
    with pytest.raises(Exception, match="model: this network ignores class labels"):
        node(env, "GFCGGuider", model=um, positive=env["cm"].label_cond(3), classifier=env["clf"], **KW)


def test_unconditional_edm2_main_model_is_refused(env):
    import edm2_helpers as H

    from comfyui_gfcg.edm2.checkpoint import EDM2Checkpoint
    from comfyui_gfcg.edm2.comfy_model import class_label_conditioning, model_from_checkpoint
    from comfyui_gfcg.edm2.network import EDM2Config

    cfgd = H.small_cfg("img64", 0)
    m = model_from_checkpoint(EDM2Checkpoint(EDM2Config.from_dict(cfgd), H.random_state_dict(cfgd), None, "uncond"),
                              "fp32")
    with pytest.raises(Exception, match="model: this network ignores class labels"):
        node(env, "GFCGGuider", model=m, positive=class_label_conditioning([3], num_classes=10), classifier=env["clf"],
             **KW)


def test_unconditional_guide_in_swap_mode_is_refused_additive_works(env):
    """An unconditional guide in swap mode: G(c_ref) = G(no class), the reference class changed
    nothing (review: uncond_guide.py). Refused; additive mode (the reference on the main model) works
    and its reference class matters."""
    cm = env["cm"]
    m, _ = cm.tiny_model(seed=0)
    guide = _uncond_model(env, seed=1, width=8)
    pos = cm.label_cond(3)
    outs = {}
    for fixed in ("1", "7"):
        g = node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"],
                 **dict(KW, alpha=4.0, reference="fixed", fixed_reference_class=fixed))
        with pytest.raises(Exception, match="guide_model: this guide ignores class labels"):
            node(env, "GFCGCombiner", gfcg=g, combine_with="autoguidance", mode="swap", scale=2.0, guide_model=guide)
        comb = node(env, "GFCGCombiner", gfcg=g, combine_with="autoguidance", mode="additive", scale=2.0,
                    guide_model=guide)
        outs[fixed] = sample(comb)
    assert not torch.equal(outs["1"], outs["7"])


def test_swap_mode_keeps_cfg_where_no_decision_is_in_force(env):
    """Found while fixing the CFG hooks: in swap mode the negative waited for a decision even where
    none would come (tau = 0; steps outside the window), so those steps had no CFG at all. At tau = 0
    GFCG + CFG swap must be ComfyUI's CFG (outside the window: tests/test_core.py)."""
    cm = env["cm"]
    m, _ = cm.tiny_model()
    pos, neg = cm.label_cond(3), cm.label_cond(None)
    comb = node(env, "GFCGCombiner", gfcg=node(env, "GFCGGuider", model=m, positive=pos, classifier=env["clf"],
                                               **dict(KW, tau=0.0)),
                combine_with="cfg", mode="swap", scale=4.0, negative=neg)
    assert torch.equal(sample(comb), sample(_cfg_guider(m, pos, neg, 4.0)))
