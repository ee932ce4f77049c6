"""Per-sample controls through GFCG's row-subset forwards (issue 25 item 1): a ControlNet or
T2I-Adapter with one hint image per sample, and a model patch holding per-image embeddings (as an
IP-Adapter does), built from ComfyUI's own classes on a tiny class-label model. ComfyUI fits such
inputs to a smaller batch by its first rows (and up to 0.33 caches the cut-down ControlNet hint), so
every row must still get its own hint / embedding in every forward, and tau = 0 must stay ComfyUI's
plain path bit for bit."""
import pytest
import torch

from conftest import node, sample

pytestmark = pytest.mark.comfy

B = 4
GFCG = dict(desired_class="3", tau=0.5, alpha=4.0, beta=1.0, window_start=0.0, window_end=1.0, period=1,
            reference="deterministic")
PATCH = "gfcg_test_per_image"


class Says3(torch.nn.Module):
    """A classifier that always answers class 3: rows that want 5 are confused, rows that want 3 are not."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 3] = 6.0
        return logits + self.w * x.mean()


def says3():
    from comfyui_gfcg.classifiers.comfy_classifier import ComfyClassifier
    from comfyui_gfcg.classifiers.timm_classifier import DataConfig, ImageClassifier

    return ComfyClassifier(ImageClassifier(Says3(), DataConfig(input_size=(3, 16, 16), crop_pct=1.0),
                                           [str(i) for i in range(10)]))


class Recorder:
    """Which sample each row of each forward is (found by matching x against the last whole-batch
    forward of the evaluation, whose rows are the samples in order) and which hint / embedding it got."""

    def __init__(self):
        self.calls = []       # (sample of each row, control's image of each row or None, patch's or None)
        self.samples = None

    def rows_of(self, x):
        if x.shape[0] % B == 0 and (self.samples is None or not any(torch.equal(x[0], s) for s in self.samples)):
            self.samples = x[:B].clone()    # a new evaluation starts with the whole positive
        return [next(j for j in range(B) if torch.equal(r, self.samples[j])) for r in x]


def make_model(env, rec):
    """The tests' tiny class-label model, with a text slot (ControlNet reads ``c_crossattn``), whose
    net adds the control's output and runs the ``PATCH`` model patches, recording both per row."""
    import comfy.conds
    import comfy.model_management as mm
    import comfy.model_patcher

    cm = env["cm"]

    class Net(cm.TinyNet):
        def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kw):
            out = super().forward(x, timesteps, context=context, y=y, **kw)
            hint = patched = None
            if control is not None:
                c = control["output"][0]
                c = c.expand(x.shape[0], *c.shape[1:]) if c.shape[0] == 1 else c   # one image: broadcast
                hint = (c[:, 0, 0, 0].round().long() - 1).tolist()
                out = out + 0.05 * c                      # a control of the wrong batch size fails here
            for p in transformer_options.get("patches", {}).get(PATCH, []):
                out, patched = p(out, y, transformer_options["cond_or_uncond"])
            rec.calls.append((rec.rows_of(x), hint, patched))
            return out

    class M(cm.TinyModel):
        def extra_conds(self, **kw):
            out = super().extra_conds(**kw)
            if kw.get("cross_attn") is not None:
                out["c_crossattn"] = comfy.conds.CONDCrossAttn(kw["cross_attn"])
            return out

    dev = mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(M(Net(0, 16)), load_device=dev, offload_device=dev)


class FakeControlModel(torch.nn.Module):
    """A ControlNet body whose one output is its hint (image i's hint is the constant i + 1)."""
    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, hint, timesteps, context, **kw):
        return {"output": [hint.clone()]}


class FakeAdapter(torch.nn.Module):
    """A T2I-Adapter body whose one output is its hint."""
    unshuffle_amount = 1

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, hint):
        return {"output": [hint.clone()]}


def hints(n):
    return torch.arange(1, n + 1).float().view(n, 1, 1, 1).expand(n, 3, 16, 16).contiguous()   # image i: all i + 1


def control(kind, n=B):
    import comfy.controlnet
    import comfy.model_management as mm

    dev = mm.get_torch_device()
    if kind == "t2i":
        c = comfy.controlnet.T2IAdapter(FakeAdapter(), 3, 1, "nearest-exact", device=dev)
    else:
        c = comfy.controlnet.ControlNet(FakeControlModel(), compression_ratio=1, load_device=dev)
    return c.copy().set_cond_hint(hints(n), 1.0, (0.0, 1.0))


def conds(ctl):
    """Per-image classes 3;5 cycled over the batch (rows 1 and 3 confused), and a negative with the same
    control (as ComfyUI's Apply ControlNet sets it on both)."""
    lab = torch.zeros(2, 10)
    lab[0, 3] = lab[1, 5] = 1
    extra = {} if ctl is None else {"control": ctl}
    pos = [[torch.zeros(1, 1, 8), {"class_labels": lab, **extra}]]
    neg = [[torch.zeros(1, 1, 8), {"class_labels": torch.zeros(1, 10), **extra}]]
    return pos, neg


def guider(env, m, pos, neg, combine, tau=GFCG["tau"]):
    g = node(env, "GFCGGuider", model=m, positive=pos, classifier=says3(), **dict(GFCG, tau=tau))
    if combine != "none":
        g = node(env, "GFCGCombiner", gfcg=g, combine_with="cfg", mode=combine, scale=3.0, negative=neg)
    return g


def confused_at_first_step(g):
    return [i for i, r in enumerate(g.engine.trace[0].reference) if r >= 0]


@pytest.mark.parametrize("kind,combine", [("controlnet", "none"), ("controlnet", "additive"),
                                          ("controlnet", "swap"), ("t2i", "none")])
def test_each_row_gets_its_own_hint_in_every_forward(env, kind, combine):
    rec = Recorder()
    m = make_model(env, rec)
    pos, neg = conds(control(kind))
    g = guider(env, m, pos, neg, combine)
    sample(g, batch=B, steps=5)
    assert confused_at_first_step(g) == [1, 3]
    assert len(rec.calls) > 5                                   # the reference branch ran
    for rows, hint, _ in rec.calls:
        assert hint == rows, f"the control gave rows {rows} the hints of images {hint}"


def test_one_hint_image_still_slices_the_subsets(env):
    """The usual single control image fits any rows: the confused rows' reference stays a 2-row forward."""
    rec = Recorder()
    m = make_model(env, rec)
    pos, neg = conds(control("controlnet", n=1))
    g = guider(env, m, pos, neg, "none")
    sample(g, batch=B, steps=5)
    assert [rows for rows, _, _ in rec.calls if len(rows) < B] == [[1, 3]] * 5
    assert all(hint == [0] * len(rows) for rows, hint, _ in rec.calls)


@pytest.mark.parametrize("combine", ["none", "additive", "swap"])
def test_model_patch_with_per_image_embeddings(env, combine):
    """A patch that fits per-image embeddings to its batch by the first rows, per cond / uncond chunk,
    as an IP-Adapter's attention patch does: each row gets its own embedding, and a negative is marked uncond."""
    rec = Recorder()
    m = make_model(env, rec).clone()
    embeds = torch.arange(B)

    def patch(out, y, cond_or_uncond):
        per = out.shape[0] // len(cond_or_uncond)
        embed = [int(e) for _ in cond_or_uncond for e in embeds[:per]]
        flag = [w for w in cond_or_uncond for _ in range(per)]
        return out, (embed, flag, (y.abs().sum(1) == 0).long().tolist())   # the negative's label is empty

    m.set_model_patch(patch, PATCH)
    pos, neg = conds(None)
    g = guider(env, m, pos, neg, combine)
    sample(g, batch=B, steps=5)
    assert confused_at_first_step(g) == [1, 3]
    for rows, _, (embed, flag, negative) in rec.calls:
        assert embed == rows, f"the patch gave rows {rows} the embeddings of images {embed}"
        assert flag == negative, f"cond_or_uncond marks {flag} for rows whose negative-ness is {negative}"
    assert any(1 in neg_rows for _, _, (_, _, neg_rows) in rec.calls) == (combine != "none")


@pytest.mark.parametrize("per_sample", [True, False])
def test_tau0_equals_cfg_guider_with_controlnet(env, per_sample):
    import comfy.samplers

    rec = Recorder()
    m = make_model(env, rec)
    pos, neg = conds(control("controlnet", n=B if per_sample else 1))
    for cfg, combine in ((1.0, "none"), (3.0, "additive"), (3.0, "swap")):
        plain = comfy.samplers.CFGGuider(m)
        plain.set_conds(pos, neg)
        plain.set_cfg(cfg)
        ref = sample(plain, batch=B, steps=5)
        out = sample(guider(env, m, pos, neg, combine, tau=0.0), batch=B, steps=5)
        assert torch.equal(out, ref), (cfg, combine)
    without = sample(guider(env, m, *conds(None), "none", tau=0.0), batch=B, steps=5)
    assert not torch.equal(without, sample(guider(env, m, pos, neg, "none", tau=0.0), batch=B, steps=5))
