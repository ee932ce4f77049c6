"""Every ComfyUI calling convention the pack meets, bound under every recorded ComfyUI version.

``tests/data/comfyui_conventions.json`` records, per version (0.3.64, 0.33.0, 0.38), the signature of
each ComfyUI symbol the pack uses and how ComfyUI itself calls the methods the pack overrides or
wraps (facts read off the sources; docs/comfyui_compat.md is the human form). Without ComfyUI:

* each override's own signature (read from the pack's source with ``ast``, so no ComfyUI import)
  binds every recorded call ComfyUI makes to it;
* ``callconv.named_arguments`` finds every argument the override reads, under each version's
  parent signature;
* each call the pack makes into ComfyUI binds each version's signature, through ``callconv`` where
  the signature changed (and the plain form of a changed call is shown to fail, so the test can);

with a ComfyUI tree, the record is checked against the live signatures of that version.
"""
import ast
import inspect
import json

import pytest

from comfyui_gfcg.guiders.callconv import accepts, call_with_supported, named_arguments, supported_kwargs
from conftest import REPO, comfyui_version

RECORD = json.loads((REPO / "tests" / "data" / "comfyui_conventions.json").read_text())
VERSIONS = ["0.3.64", "0.33.0", "0.38"]
SYMBOLS, CONVENTIONS = RECORD["symbols"], RECORD["calling_conventions"]


def _stub(spec: dict):
    """A function with the recorded signature ``spec`` (params, defaults, varargs, varkw, kwonly)."""
    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD, default=(object() if n in spec.get("defaults", {}) else P.empty))
              for n in spec["params"]]
    if spec.get("varargs"):
        params.append(P("args", P.VAR_POSITIONAL))
    for n in spec.get("kwonly", []) or []:
        params.append(P(n, P.KEYWORD_ONLY, default=(object() if n in spec.get("defaults", {}) else P.empty)))
    if spec.get("varkw"):
        params.append(P("kwargs", P.VAR_KEYWORD))

    def f(*args, **kwargs):
        return inspect.signature(f).bind(*args, **kwargs)

    f.__signature__ = inspect.Signature(params)
    f.__qualname__ = "stub"
    return f


def _spec(symbol, version):
    s = SYMBOLS[symbol][version]
    if s is None or s.get("unknown"):
        pytest.skip(f"{symbol} at {version}: {'absent' if s is None else s.get('reason')}")
    return s


# ---------------------------------------------------------------- the pack's overrides, from source

def _method_signature(path: str, cls: str, name: str) -> inspect.Signature:
    """The signature of ``cls.name`` in the pack's file ``path``, built from its ast (no import)."""
    tree = ast.parse((REPO / path).read_text())
    node = next(n for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == cls
                for n in c.body if isinstance(n, ast.FunctionDef) and n.name == name)
    P, a = inspect.Parameter, node.args
    pos = a.posonlyargs + a.args
    first_default = len(pos) - len(a.defaults)
    params = [P(x.arg, P.POSITIONAL_OR_KEYWORD, default=(None if i >= first_default else P.empty))
              for i, x in enumerate(pos)]
    if a.vararg:
        params.append(P(a.vararg.arg, P.VAR_POSITIONAL))
    params += [P(x.arg, P.KEYWORD_ONLY, default=(None if d is not None else P.empty))
               for x, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        params.append(P(a.kwarg.arg, P.VAR_KEYWORD))
    return inspect.Signature(params)


# (pack file, class, method) -> the recorded convention ComfyUI calls it with; "self" is prepended
OVERRIDES = {
    ("guiders/comfy_guider.py", "GFCGGuider", "inner_sample"): "comfy.samplers.CFGGuider.inner_sample",
    ("guiders/comfy_gradient.py", "ClassifierGuidanceGuider", "inner_sample"): "comfy.samplers.CFGGuider.inner_sample",
    ("guiders/comfy_guider.py", "GFCGGuider", "predict_noise"): "comfy.samplers.CFGGuider.predict_noise",
    ("guiders/comfy_gradient.py", "ClassifierGuidanceGuider", "predict_noise"): "comfy.samplers.CFGGuider.predict_noise",
    ("guiders/comfy_patch.py", "GFCGSampleWrapper", "__call__"): "comfy.patcher_extension.WrappersMP.OUTER_SAMPLE",
    ("edm2/comfy_model.py", "EDM2Model", "extra_conds"): "comfy.model_base.BaseModel.extra_conds",
    ("edm2/comfy_model.py", "EDM2DiffusionModel", "forward"): "diffusion_model.forward",
    ("edm2/comfy_model.py", "EDM2LatentFormat", "process_in"): "comfy.latent_formats.LatentFormat.process_in",
    ("edm2/comfy_model.py", "EDM2LatentFormat", "process_out"): "comfy.latent_formats.LatentFormat.process_out",
    ("edm2/comfy_model.py", "EDM2PixelFormat", "process_in"): "comfy.latent_formats.LatentFormat.process_in",
    ("edm2/comfy_model.py", "EDM2PixelFormat", "process_out"): "comfy.latent_formats.LatentFormat.process_out",
}


def _convention_calls(convention: str, version: str):
    """[(site, args, kwargs)] of the recorded calls ComfyUI ``version`` makes (placeholder values)."""
    entry = CONVENTIONS[convention]
    sites = entry["callers"].values() if "callers" in entry else [entry]
    out = []
    for s in sites:
        c = s.get(version)
        if c is None or c.get("unknown"):
            continue
        kwargs = {}
        for k in c.get("kwargs", []):
            if k.startswith("**") or k.startswith("<"):
                kwargs.update({"y": 0, "class_labels": 0})  # what a cond dict / extra_conds may hold
            else:
                kwargs[k] = 0
        args = [0 for _ in c.get("args", [])]
        out.append((c.get("site"), args, kwargs))
    return out


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", sorted(OVERRIDES), ids=lambda t: f"{t[1]}.{t[2]}")
def test_each_override_binds_every_recorded_call(target, version):
    path, cls, name = target
    sig = _method_signature(path, cls, name)
    calls = _convention_calls(OVERRIDES[target], version)
    if not calls:
        pytest.skip(f"no recorded call site of {OVERRIDES[target]} at {version}")
    for site, args, kwargs in calls:
        try:
            sig.bind(object(), *args, **kwargs)
        except TypeError as e:
            pytest.fail(f"{cls}.{name}{sig} does not take ComfyUI {version}'s call at {site}: {e}")


def test_the_overrides_that_comfyui_grows_take_anything():
    """The methods whose argument lists ComfyUI extends take ``*args, **kwargs`` (and read names)."""
    for path, cls, name in [("guiders/comfy_guider.py", "GFCGGuider", "inner_sample"),
                            ("guiders/comfy_gradient.py", "ClassifierGuidanceGuider", "inner_sample"),
                            ("guiders/comfy_patch.py", "GFCGSampleWrapper", "__call__")]:
        kinds = [p.kind for p in _method_signature(path, cls, name).parameters.values()]
        assert inspect.Parameter.VAR_POSITIONAL in kinds and inspect.Parameter.VAR_KEYWORD in kinds, (cls, name)


def test_a_frozen_argument_list_fails_the_check():
    """The check can fail: v0.3.64's fixed inner_sample list refuses v0.33's call (latent_shapes)."""
    frozen = _stub(SYMBOLS["comfy.samplers.CFGGuider.inner_sample"]["0.3.64"])
    (site, args, kwargs), = _convention_calls("comfy.samplers.CFGGuider.inner_sample", "0.33.0")
    with pytest.raises(TypeError):
        frozen(object(), *args, **kwargs)


# ---------------------------------------------------------------- reading arguments by name

READS = {  # parent signature -> the names the pack's override reads from it
    "comfy.samplers.CFGGuider.inner_sample": ["noise", "latent_image", "device", "sigmas", "denoise_mask", "seed"],
    "comfy.samplers.CFGGuider.outer_sample": ["noise", "latent_image", "sampler", "sigmas", "denoise_mask",
                                              "callback", "disable_pbar", "seed"],
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("parent", sorted(READS))
def test_named_arguments_reads_every_version(parent, version):
    stub = _stub(_spec(parent, version))
    convention = parent if parent in CONVENTIONS else None
    calls = _convention_calls(convention, version) if convention else []
    if parent == "comfy.samplers.CFGGuider.outer_sample":   # the OUTER_SAMPLE wrapper's arguments, less the executor
        calls = [(s, a[1:], k) for s, a, k in _convention_calls("comfy.patcher_extension.WrappersMP.OUTER_SAMPLE", version)]
    assert calls, f"no recorded call of {parent} at {version}"
    for site, args, kwargs in calls:
        values = list(range(100, 100 + len(args)))
        got = named_arguments(stub, tuple(values), {k: f"kw:{k}" for k in kwargs})
        for name in READS[parent]:
            assert name in got, (parent, version, name)
        for k in kwargs:                         # newer arguments reach the override by name
            assert got[k] == f"kw:{k}"


# ---------------------------------------------------------------- the pack's calls into ComfyUI

# symbol -> (positional arguments the pack passes, keywords passed as such, keywords passed through
#            callconv only where the callee takes them); each row names the call site
CALLS = {
    "comfy.model_patcher.ModelPatcher.prepare_state": (["self", "t"], {}, {"model_options": {}}),   # comfy_forward._fused
    "comfy.samplers.process_conds": (["model", "noise", "conds", "device", "latent", "mask", "seed"], {},
                                     {"latent_shapes": None}),                                       # GFCGGuider._process_conds
    "comfy.model_base.BaseModel.memory_required": (["self", "shape"], {}, {"cond_shapes": {}}),    # comfy_forward._memory_required
    "comfy.model_management.get_free_memory": (["device"], {}, {}),                                 # comfy_forward._free_memory
    "comfy.samplers.calc_cond_batch": (["model", "conds", "x", "t", "model_options"], {}, {}),     # batched_forward
    "comfy.samplers.cond_cat": (["conds"], {}, {}),                                                 # _fused
    "comfy.sampler_helpers.convert_cond": (["raw"], {}, {}),                                        # GFCGGuider._process
    "comfy.model_patcher.ModelPatcher.apply_hooks": (["self"], {"hooks": None}, {}),                # _fused
    "comfy.patcher_extension.merge_nested_dicts": (["a", "b"], {"copy_dict1": False}, {}),          # _fused
    "comfy.patcher_extension.get_all_wrappers": (["kind", "model_options"], {"is_model_options": True}, {}),  # _fusable
    "comfy.model_patcher.ModelPatcher.__init__": (["self", "model"], {"load_device": 0, "offload_device": 0}, {}),
    "comfy.model_patcher.ModelPatcher.clone": (["self"], {}, {}),
    "comfy.model_patcher.ModelPatcher.set_additional_models": (["self", "key", "models"], {}, {}),
    "comfy.model_patcher.ModelPatcher.add_wrapper_with_key": (["self", "kind", "key", "fn"], {}, {}),  # comfy_patch
    "comfy.model_patcher.ModelPatcher.remove_wrappers_with_key": (["self", "kind", "key"], {}, {}),
    "comfy.model_patcher.ModelPatcher.get_wrappers": (["self", "kind", "key"], {}, {}),              # trace_nodes
    "comfy.samplers.CFGGuider.sample": (["self", "noise", "latent", "sampler", "sigmas", "mask", "callback",
                                         "disable_pbar", "seed"], {}, {}),                            # GFCGSampleWrapper
    "comfy.taesd.taesd.TAESD.__init__": (["self", "encoder_path", "decoder_path"], {"latent_channels": 4}, {}),
    "comfy.utils.load_torch_file": (["path"], {"safe_load": True}, {}),
    "comfy.model_management.free_memory": (["nbytes", "device"], {"keep_loaded": []}, {"for_dynamic": False}),  # reserve_memory
    "comfy.model_management.minimum_inference_memory": ([], {}, {}),                                  # reserve_memory
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("symbol", sorted(CALLS))
def test_each_call_binds_every_version(symbol, version):
    assert symbol in SYMBOLS, f"{symbol} is not in the record"
    stub = _stub(_spec(symbol, version))
    args, kwargs, optional = CALLS[symbol]
    call_with_supported(stub, *args, **kwargs, **optional)


def test_changed_calls_fail_without_callconv():
    """Where the signature changed, the plain call breaks on one side: prepare_state(t) on 0.33,
    process_conds(..., latent_shapes=...) on 0.3.64 -- the reason callconv exists."""
    with pytest.raises(TypeError):
        _stub(SYMBOLS["comfy.model_patcher.ModelPatcher.prepare_state"]["0.33.0"])("self", "t")
    with pytest.raises(TypeError):
        _stub(SYMBOLS["comfy.samplers.process_conds"]["0.3.64"])(*"abcdefg", latent_shapes=None)
    assert not accepts(_stub(SYMBOLS["comfy.samplers.process_conds"]["0.3.64"]), "latent_shapes")
    assert supported_kwargs(_stub(SYMBOLS["comfy.samplers.process_conds"]["0.33.0"]), {"latent_shapes": 1}) == {"latent_shapes": 1}


def test_model_options_keys_the_fused_forward_steps_aside_for():
    """Every recorded model_options key under which ComfyUI runs its own batching path is one the
    fused forward leaves to ComfyUI (read from the source: no ComfyUI import)."""
    tree = ast.parse((REPO / "guiders" / "comfy_forward.py").read_text())
    keys = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "_OWN_PATH_KEYS" for t in n.targets))
    for k in ("multigpu_clones", "context_handler", "model_function_wrapper"):
        assert k in RECORD["model_options_keys"], k
        assert k in keys, k


# ---------------------------------------------------------------- the record against a live tree

@pytest.mark.comfy
def test_record_matches_the_live_comfyui(comfy):
    """The recorded signatures of this tree's version are the live ones (so the record is true)."""
    import importlib

    version = "%d.%d.%d" % comfyui_version()
    if version not in VERSIONS:
        pytest.skip(f"ComfyUI {version} is not a recorded version")
    checked, wrong = 0, []
    for symbol, entry in SYMBOLS.items():
        spec = entry.get(version)
        if not spec or "params" not in spec:
            continue
        parts, obj = symbol.split("."), None
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for p in parts[i:]:
                    obj = getattr(obj, p)
            except AttributeError:
                obj = None
            break
        if obj is None or not callable(obj):
            continue
        try:
            live = inspect.signature(getattr(obj, "__func__", obj))   # classmethods with their cls
        except (TypeError, ValueError):
            continue
        names = [p.name for p in live.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        recorded = list(spec["params"]) + [n for n in spec.get("kwonly", []) or [] if n not in spec["params"]]
        if names != recorded:
            wrong.append(f"{symbol}: recorded {recorded}, live {names}")
        checked += 1
    assert checked >= 40, checked
    assert not wrong, "\n".join(wrong)
