"""Text reference conditioning against real ComfyUI conditioning: the reference is the positive with
only its text part replaced (issue "Correctness" item 8, "Text-to-image" item 2).

The CLIPs are ComfyUI's own text encoders (SD1.5's CLIP-L, SDXL's CLIP-L + CLIP-G, Flux's CLIP-L +
T5-XXL) with the real tokenizers of the tree and tiny random weights (the ``*_model_config``
overrides ComfyUI's text encoders take), so ``tokenize`` / ``encode_from_tokens_scheduled`` and
the keys they write are ComfyUI's. The positives are built with ComfyUI's conditioning nodes.
"""
import pytest
import torch

from conftest import load_comfy

pytestmark = pytest.mark.comfy

NAMES = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
TEMPLATE = "a photo of a {}"
SMALL_CLIP = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 3,
              "projection_dim": 16}
SMALL_T5 = {"d_ff": 32, "d_kv": 8, "d_model": 16, "num_heads": 2, "num_layers": 1}


def _tiny_clip(tokenizer, model, model_options, seed=0):
    import comfy.sd
    import comfy.supported_models_base

    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(tokenizer, model), model_options=model_options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():          # ComfyUI's layers skip initialisation: give them finite weights
        for p in clip.cond_stage_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return clip


@pytest.fixture(scope="module")
def comfy_env():
    st = load_comfy()
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.flux

    small_g = dict(SMALL_CLIP, hidden_size=24)
    clips = {
        "sd15": _tiny_clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel,
                           {"clip_l_model_config": SMALL_CLIP}),
        "sdxl": _tiny_clip(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel,
                           {"clip_l_model_config": SMALL_CLIP, "clip_g_model_config": small_g}),
        "flux": _tiny_clip(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip(),
                           {"clip_l_model_config": SMALL_CLIP, "t5xxl_model_config": SMALL_T5}),
    }
    return dict(reg=st["nodes"].NODE_CLASS_MAPPINGS, clips=clips)


def run(env, name, **kw):
    """The first output of ComfyUI node ``name`` (V1 or V3 API) called with ``kw``."""
    cls = env["reg"][name]
    if hasattr(cls, "define_schema"):
        return cls.execute(**kw).result[0]
    return getattr(cls(), cls.FUNCTION)(**kw)[0]


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def text_reference(clip, positive):
    from comfyui_gfcg.guiders.references import TextReference

    return TextReference(clip, TEMPLATE, NAMES, positive=positive)


def assert_reference(ref, positive, fresh):
    """``ref`` is ``positive`` entry by entry with the tensor and the text keys of ``fresh`` (one
    entry) and every other key of the positive's entry, the same objects."""
    assert len(ref) == len(positive), f"{len(ref)} reference entries for {len(positive)} positive entries"
    (ft, fd), = fresh
    for (rt, rd), (pt, pd) in zip(ref, positive):
        assert torch.equal(rt, ft), "the cross-attention tensor must be the reference encoding's"
        missing = sorted(set(pd) - set(rd))
        assert not missing, f"the reference lost the positive's keys {missing}"
        for k, v in pd.items():
            if k in fd:
                assert _same(rd[k], fd[k]), f"{k}: the reference's must be the reference encoding's"
            else:
                assert rd[k] is v, f"{k}: the reference's must be the positive's"
        assert set(rd) == set(pd) | set(fd)


def _same(a, b):
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_sd15_area_mask_strength_timestep_range_carried(comfy_env):
    env = comfy_env
    clip = env["clips"]["sd15"]
    pos = run(env, "CLIPTextEncode", clip=clip, text="a red sports car parked on a wet street at night")
    pos = run(env, "ConditioningSetArea", conditioning=pos, width=64, height=32, x=8, y=16, strength=0.7)
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1.0
    pos = run(env, "ConditioningSetMask", conditioning=pos, mask=mask, set_cond_area="mask bounds", strength=0.9)
    pos = run(env, "ConditioningSetTimestepRange", conditioning=pos, start=0.1, end=0.8)
    assert {"area", "mask", "strength", "set_area_to_bounds", "mask_strength", "start_percent", "end_percent",
            "pooled_output"} <= set(pos[0][1])

    ref = text_reference(clip, pos)(1)
    fresh = encode(clip, "a photo of a goldfish")
    assert_reference(ref, pos, fresh)
    assert ref[0][1]["area"] == pos[0][1]["area"] and ref[0][1]["start_percent"] == pytest.approx(0.1)
    assert not torch.equal(ref[0][1]["pooled_output"], pos[0][1]["pooled_output"])


def test_sdxl_size_conditioning_carried(comfy_env):
    env = comfy_env
    clip = env["clips"]["sdxl"]
    pos = run(env, "CLIPTextEncodeSDXL", clip=clip, width=1024, height=768, crop_w=32, crop_h=16, target_width=896,
              target_height=640, text_g="a lighthouse on a cliff, oil painting", text_l="a lighthouse on a cliff")
    size = {"width": 1024, "height": 768, "crop_w": 32, "crop_h": 16, "target_width": 896, "target_height": 640}
    assert {k: pos[0][1][k] for k in size} == size

    ref = text_reference(clip, pos)(2)
    fresh = encode(clip, "a photo of a great white shark")
    assert_reference(ref, pos, fresh)
    assert {k: ref[0][1][k] for k in size} == size
    assert torch.equal(ref[0][1]["pooled_output"], fresh[0][1]["pooled_output"])


def test_flux_guidance_carried(comfy_env):
    env = comfy_env
    clip = env["clips"]["flux"]
    pos = run(env, "CLIPTextEncode", clip=clip, text="a watercolor fox in the snow")
    pos = run(env, "FluxGuidance", conditioning=pos, guidance=3.5)
    assert pos[0][1]["guidance"] == 3.5

    ref = text_reference(clip, pos)(0)
    fresh = encode(clip, "a photo of a tench")
    assert_reference(ref, pos, fresh)
    assert ref[0][1]["guidance"] == 3.5
    assert ref[0][0].shape == fresh[0][0].shape          # T5 tokens of the reference prompt


def test_combined_area_conds_give_one_reference_entry_each(comfy_env):
    env = comfy_env
    clip = env["clips"]["sd15"]
    left = run(env, "ConditioningSetArea", conditioning=run(env, "CLIPTextEncode", clip=clip, text="a cat"),
               width=32, height=64, x=0, y=0, strength=1.0)
    right = run(env, "ConditioningSetArea", conditioning=run(env, "CLIPTextEncode", clip=clip, text="a dog, photo"),
                width=32, height=64, x=32, y=0, strength=0.5)
    pos = run(env, "ConditioningCombine", conditioning_1=left, conditioning_2=right)
    assert len(pos) == 2

    ref = text_reference(clip, pos)(1)
    fresh = encode(clip, "a photo of a goldfish")
    assert_reference(ref, pos, fresh)
    assert [r[1]["area"] for r in ref] == [p[1]["area"] for p in pos]
    assert [r[1]["strength"] for r in ref] == [1.0, 0.5]
    assert torch.equal(ref[0][0], ref[1][0])              # the same reference text in every entry


def test_hooks_of_the_positive_carried(comfy_env):
    import comfy.hooks

    env = comfy_env
    clip = env["clips"]["sd15"]
    hooks = comfy.hooks.create_hook_lora({}, strength_model=1.0, strength_clip=1.0)
    pos = run(env, "CLIPTextEncode", clip=clip, text="a castle")
    pos = run(env, "ConditioningSetProperties", cond_NEW=pos, strength=0.8, set_cond_area="default", hooks=hooks,
              mask=torch.ones(1, 8, 8), timesteps=(0.0, 0.5))
    assert {"hooks", "mask", "mask_strength", "start_percent"} <= set(pos[0][1])

    ref = text_reference(clip, pos)(0)
    assert_reference(ref, pos, encode(clip, "a photo of a tench"))
    assert ref[0][1]["hooks"] is pos[0][1]["hooks"] and ref[0][1]["mask_strength"] == 0.8


def test_scheduled_clip_pairs_entries_by_clip_range(comfy_env):
    """A CLIP with scheduled hooks encodes one entry per keyframe range (clip_start/end_percent):
    each positive entry gets the reference entry of its own range, with the positive's hooks."""
    import comfy.hooks

    env = comfy_env
    hooks = comfy.hooks.create_hook_lora({}, strength_model=1.0, strength_clip=1.0)
    kf = run(env, "CreateHookKeyframesInterpolated", strength_start=1.0, strength_end=0.5, interpolation="linear",
             start_percent=0.0, end_percent=1.0, keyframes_count=3)
    hooks = run(env, "SetHookKeyframes", hooks=hooks, hook_kf=kf)
    clip = run(env, "SetClipHooks", clip=env["clips"]["sd15"], apply_to_conds=True, schedule_clip=True, hooks=hooks)
    pos = run(env, "CLIPTextEncode", clip=clip, text="a mountain lake")
    pos = run(env, "FluxGuidance", conditioning=pos, guidance=2.0)   # any non-text key, on every entry
    assert len(pos) >= 2 and all("clip_start_percent" in p[1] and "hooks" in p[1] for p in pos)

    ref = text_reference(clip, pos)(1)
    fresh = encode(clip, "a photo of a goldfish")
    assert len(ref) == len(pos) == len(fresh)
    for (rt, rd), (pt, pd), (ft, fd) in zip(ref, pos, fresh):
        assert (rd["clip_start_percent"], rd["clip_end_percent"]) == (pd["clip_start_percent"], pd["clip_end_percent"])
        assert torch.equal(rt, ft) and rd["guidance"] == 2.0 and rd["hooks"] is pd["hooks"]


def test_positive_untouched_and_reference_cached(comfy_env):
    env = comfy_env
    clip = env["clips"]["sdxl"]
    pos = run(env, "CLIPTextEncodeSDXL", clip=clip, width=512, height=512, crop_w=0, crop_h=0, target_width=512,
              target_height=512, text_g="a bowl of fruit", text_l="a bowl of fruit")
    before = [(t.clone(), dict(d)) for t, d in pos]
    tr = text_reference(clip, pos)
    a = tr(1)
    assert tr(1) is a
    for (t, d), (bt, bd) in zip(pos, before):
        assert torch.equal(t, bt) and d.keys() == bd.keys() and all(d[k] is bd[k] for k in d)
    assert a[0][1] is not pos[0][1]


def test_make_reference_passes_the_positive(comfy_env):
    """The guider's reference source (``make_reference`` with a CLIP) keeps the positive's keys:
    SDXL size conditioning here."""
    from comfyui_gfcg.guiders.checks import make_reference

    env = comfy_env
    clip = env["clips"]["sdxl"]
    pos = run(env, "CLIPTextEncodeSDXL", clip=clip, width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024,
              target_height=1024, text_g="a harbour at dawn", text_l="a harbour at dawn")
    pos = run(env, "ConditioningSetTimestepRange", conditioning=pos, start=0.0, end=0.9)
    ref = make_reference(pos, NAMES, clip, TEMPLATE)(1)
    assert_reference(ref, pos, encode(clip, "a photo of a goldfish"))
