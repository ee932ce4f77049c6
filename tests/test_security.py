"""Security: no file is ever loaded with unrestricted unpickling (issue 7, part 2).

- Every file of the malicious corpus (``malicious_corpus.py``: pickle, torch zip / legacy, storage
  blobs, numpy object arrays, gadget chains, ... each creating a sentinel file if ever executed)
  goes through every loader of the pack that accepts its extension; each is refused with the
  pack's error type, the message names the file, and no sentinel appears. The corpus is shown to be
  live: loaded with the unrestricted loaders in a separate process, every payload runs.
- The same, with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the environment (a setting users apply
  to load old checkpoints; also what torch < 2.6 does by default): a loader whose safety rests on
  ``torch.load``'s *default* (somewhere down a library's fallback path) fails this.
- A static check of the pack's sources: no torch.load without ``weights_only=True``, no pickle
  loading outside the EDM2 restricted unpickler, no ``np.load(allow_pickle=True)``, ``eval`` /
  ``exec``, unsafe ``yaml.load``, ``torch.jit.load`` or ``marshal``.
- Valid weights-only files still load (the refusals are not "everything fails").

Core tests: no ComfyUI needed.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import malicious_corpus as MC
from comfyui_gfcg.classifiers.clip_classifier import CLIP_EXTENSIONS, load_zero_shot_classifier
from comfyui_gfcg.classifiers.timm_classifier import WEIGHT_EXTENSIONS, load_timm_classifier
from comfyui_gfcg.edm2 import CheckpointError, read_checkpoint
from comfyui_gfcg.guiders.config import GFCGInputError

REPO = Path(__file__).resolve().parents[1]
EDM2_EXTENSIONS = (".pkl", ".safetensors", ".sft")
TIMM_ARCH = "test_resnet"   # timm's tiny test architecture
CLIP_ARCH = "gfcg-security-tiny-clip"
CLIP_TINY = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CLASSES = ["tabby cat", "red fox"]
TEMPLATES = ["a photo of a {}."]


def register_tiny_clip(folder) -> str:
    import open_clip

    cfg = os.path.join(os.fspath(folder), f"{CLIP_ARCH}.json")
    with open(cfg, "w") as f:
        json.dump(CLIP_TINY, f)
    if CLIP_ARCH not in open_clip.list_models():
        open_clip.add_model_config(cfg)
    return CLIP_ARCH


# loader name -> (call, extensions it accepts, the error type it must raise)
LOADERS = {
    "timm": (lambda p: load_timm_classifier(p, TIMM_ARCH), tuple(WEIGHT_EXTENSIONS), GFCGInputError),
    "open_clip": (lambda p: load_zero_shot_classifier(p, CLIP_ARCH, CLASSES, TEMPLATES), tuple(CLIP_EXTENSIONS),
                  GFCGInputError),
    "edm2": (read_checkpoint, EDM2_EXTENSIONS, CheckpointError),
}


def accepts(loader: str, name: str) -> bool:
    return os.path.splitext(name)[1].lower() in LOADERS[loader][1]


CASES = [(loader, name) for name in MC.NAMES for loader in LOADERS if accepts(loader, name)]


def wait_and_check(sentinels, delay=0.3):
    """Sentinels that exist (after a short wait: Popen payloads would run asynchronously)."""
    deadline = time.time() + delay
    while True:
        ran = [s for s in sentinels if os.path.exists(s)]
        if ran or time.time() >= deadline:
            return ran
        time.sleep(0.05)


def try_load(loader: str, entry: MC.Entry):
    """None if the loader refused the file properly; else a description of what went wrong."""
    call, _, error_type = LOADERS[loader]
    raised = "no exception"
    try:
        call(entry.path)
    except error_type as e:
        raised = f"{type(e).__name__}: {e}"
        problem = None if entry.name in str(e) else "the message does not name the file"
    except Exception as e:  # noqa: BLE001 - any other exception type is a finding too
        raised = f"{type(e).__name__}: {e}"
        problem = f"raised {type(e).__name__} instead of {error_type.__name__}"
    else:
        problem = "ACCEPTED the file"
    if wait_and_check([entry.sentinel], delay=0.3 if "popen" in entry.name else 0.0):
        problem = "RAN THE PAYLOAD (sentinel created)" + (f"; also {problem}" if problem else "")
    return None if problem is None else f"{problem} [{raised}]"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    pytest.importorskip("open_clip")
    return register_tiny_clip(tmp_path_factory.mktemp("clip_cfg"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    sentinels = tmp_path_factory.mktemp("sentinels")
    entries = {e.name: e for e in MC.write_corpus(folder, sentinels, per_file=True)}
    yield entries
    # no payload ran at any time, late (asynchronous) ones included
    assert not wait_and_check([e.sentinel for e in entries.values()], delay=0.5)
    assert not any(sentinels.iterdir()), sorted(os.listdir(sentinels))


# ----------------------------------------------------------------------------------------------
# the corpus is large, varied and live


def test_corpus_size_and_variety():
    assert len(MC.SPECS) >= 20
    exts = {os.path.splitext(n)[1] for n in MC.NAMES}
    assert {".pkl", ".pt", ".pth", ".bin", ".safetensors"} <= exts
    assert {s.unsafe for s in MC.SPECS} == {"pickle", "torch", "numpy"}
    for loader in LOADERS:
        assert sum(1 for c in CASES if c[0] == loader) >= 10, loader


def test_corpus_payloads_are_live(tmp_path):
    """Loaded unrestrictedly in a separate process (cwd in a temp dir), every file runs its payload;
    the sentinels of this test are its own (per file), never those of the refusal tests."""
    work = tmp_path / "cwd"
    work.mkdir()
    sentinels = tmp_path / "live_sentinels"
    sentinels.mkdir()
    entries = MC.write_corpus(tmp_path / "corpus", sentinels, per_file=True)
    args = json.dumps([[e.path, e.unsafe, e.sentinel] for e in entries])
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_FORCE")}
    r = subprocess.run([sys.executable, "-c", MC.UNSAFE_LOADER_SOURCE, args], cwd=work, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    dead = [e.name for e in entries if not os.path.exists(e.sentinel)]
    assert not dead, f"inert corpus files (payload did not run under {[e.unsafe for e in entries]}): {dead}"


# ----------------------------------------------------------------------------------------------
# every loader refuses every file it accepts by extension


@pytest.mark.parametrize("loader,name", CASES, ids=[f"{lo}-{n}" for lo, n in CASES])
def test_malicious_file_is_refused_without_side_effect(loader, name, corpus, request):
    if loader == "open_clip":
        request.getfixturevalue("tiny_clip")
    entry = corpus[name]
    assert not os.path.exists(entry.sentinel)
    problem = try_load(loader, entry)
    assert problem is None, f"{loader} loader on {name} ({entry.what}): {problem}"


@pytest.mark.parametrize("loader", list(LOADERS))
def test_refused_even_when_torch_defaults_to_unrestricted_loading(loader, tmp_path, monkeypatch, request):
    """With TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (torch.load's default becomes weights_only=False, as
    in torch < 2.6) every refusal must still hold: the pack may rely only on explicit
    ``weights_only=True`` / its own restricted unpickler, never on torch's default, including in
    library code it calls (e.g. a retry without ``weights_only`` after an exception)."""
    if loader == "open_clip":
        request.getfixturevalue("tiny_clip")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sentinels = tmp_path / "sentinels"
    sentinels.mkdir()
    entries = MC.write_corpus(tmp_path / "corpus", sentinels, per_file=True)
    problems = {}
    for e in entries:
        if accepts(loader, e.name):
            p = try_load(loader, e)
            if p:
                problems[e.name] = p
    assert not problems, f"{loader} loader with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1:\n" + "\n".join(
        f"  {n}: {p}" for n, p in problems.items())


def test_other_extensions_refused_by_name(corpus, tiny_clip):
    """Files whose extension a loader does not accept are refused before being opened."""
    for loader, (call, _, error_type) in LOADERS.items():
        for name, entry in corpus.items():
            if accepts(loader, name):
                continue
            with pytest.raises(error_type) as ei:
                call(entry.path)
            assert name in str(ei.value), (loader, str(ei.value))
            assert not os.path.exists(entry.sentinel)


def test_testbed_loader_refuses_pickles_under_its_file_names(tmp_path):
    from comfyui_gfcg.testbed.files import FILES
    from comfyui_gfcg.testbed.models import load_testbed

    sentinel = tmp_path / "SENTINEL"
    for rel in FILES.values():
        p = tmp_path / "weights" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(MC.raw_pickle(MC.p_posix_system(str(sentinel)), 4))
    with pytest.raises(CheckpointError) as ei:
        load_testbed(weights_dir=str(tmp_path / "weights"))
    assert os.path.basename(FILES["main"]) in str(ei.value)
    # the classifiers, read through the same loader the testbed uses
    for key in ("guidance_classifier", "eval_classifier"):
        with pytest.raises(GFCGInputError, match=os.path.basename(FILES[key])):
            load_timm_classifier(str(tmp_path / "weights" / FILES[key]))
    assert not wait_and_check([str(sentinel)])


# ----------------------------------------------------------------------------------------------
# valid files still load


def test_valid_weights_only_state_dicts_load_in_timm_loader(tmp_path):
    import timm

    net = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=7)
    sd = net.state_dict()
    files = {"plain.pt": sd, "wrapped.pth": {"state_dict": sd, "epoch": 3}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    x = torch.rand(2, 3, 64, 64)
    for name in list(files) + ["legacy.pth"]:
        clf = load_timm_classifier(str(tmp_path / name), TIMM_ARCH)
        assert clf.num_classes == 7
        for k, v in clf.net.state_dict().items():
            torch.testing.assert_close(v, sd[k])
        assert clf(x).shape == (2, 7)


def test_valid_weights_only_checkpoints_load_in_open_clip_loader(tiny_clip, tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip, pretrained=None)
    sd = model.state_dict()
    torch.save(sd, tmp_path / "tiny.pt")
    torch.save({"state_dict": sd}, tmp_path / "open_clip_pytorch_model.bin")
    for name in ("tiny.pt", "open_clip_pytorch_model.bin"):
        clf = load_zero_shot_classifier(str(tmp_path / name), tiny_clip, CLASSES, TEMPLATES)
        assert clf(torch.rand(1, 3, 32, 32)).shape == (1, 2)


def test_valid_nvlabs_pickle_loads_in_edm2_reader(tmp_path):
    import edm2_helpers as H

    sentinel = tmp_path / "SENTINEL"
    cfg = H.small_cfg("img512")
    path = tmp_path / "edm2-ok.pkl"
    path.write_bytes(H.nvlabs_pickle_bytes(cfg, H.random_state_dict(cfg), sentinel))
    assert len(read_checkpoint(str(path)).state_dict) > 100
    assert not sentinel.exists()


# ----------------------------------------------------------------------------------------------
# static check of the pack's sources

PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve")
PICKLE_LOADS = {f"{m}.{f}" for m in PICKLE_MODULES for f in ("load", "loads", "Unpickler", "_Unpickler")} | {
    "shelve.open", "pandas.read_pickle", "torch.package.PackageImporter"}
UNPICKLER_BASES = {"pickle.Unpickler", "pickle._Unpickler", "_pickle.Unpickler"}
RESTRICTED_UNPICKLER_FILE = "edm2/checkpoint.py"
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}


def _aliases(tree: ast.AST) -> dict:
    """Local name -> dotted module path, from the file's absolute imports (any scope)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node, aliases):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    head = aliases.get(node.id, node.id)
    name = ".".join([head] + parts[::-1])
    return "torch.load" if name == "torch.serialization.load" else name


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan_source(source: str, rel: str):
    """(offenders, stats) of one file: offenders as 'rel:line: what'."""
    tree = ast.parse(source, filename=rel)
    aliases = _aliases(tree)
    bad, stats = [], {"torch.load weights_only=True": 0, "restricted unpickler": 0}

    def flag(node, what):
        bad.append(f"{rel}:{node.lineno}: {what}")

    sanctioned = set()   # Unpickler base-class references that are the restricted unpickler
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = [_dotted(b, aliases) for b in node.bases]
            if any(b in UNPICKLER_BASES for b in bases):
                methods = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
                fc = methods.get("find_class")
                calls_super = fc is not None and any(
                    isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "super"
                    for n in ast.walk(fc))
                if rel == RESTRICTED_UNPICKLER_FILE and fc is not None and "persistent_load" in methods \
                        and not calls_super:
                    sanctioned.update(id(b) for b in node.bases)
                    stats["restricted unpickler"] += 1
                else:
                    flag(node, f"class {node.name} subclasses an Unpickler outside the restricted unpickler "
                               f"({RESTRICTED_UNPICKLER_FILE}: find_class from an allow-list, persistent_load "
                               "refused, no super().find_class)")
                    sanctioned.update(id(b) for b in node.bases)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] == "marshal" for m in mods):
                flag(node, "imports marshal")
            if isinstance(node, ast.ImportFrom) and (node.module or "") in PICKLE_MODULES and node.level == 0:
                for a in node.names:
                    if a.name in ("load", "loads", "Unpickler", "_Unpickler"):
                        flag(node, f"imports {node.module}.{a.name}")
        if isinstance(node, ast.Attribute) and id(node) not in sanctioned:
            name = _dotted(node, aliases)
            if name == "torch.load" and id(node) not in called:
                flag(node, "torch.load passed around uncalled (its weights_only cannot be checked)")
            elif name in PICKLE_LOADS:
                flag(node, f"uses {name} (unrestricted unpickling)")
            elif name and name.split(".")[0] == "marshal":
                flag(node, f"uses {name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name is None:
            continue
        if name == "torch.load":
            if _is_const(_kw(node, "weights_only"), True):
                stats["torch.load weights_only=True"] += 1
            else:
                flag(node, "torch.load without weights_only=True")
        elif name in ("numpy.load", "numpy.lib.format.read_array"):
            ap = _kw(node, "allow_pickle")
            if ap is not None and not _is_const(ap, False):
                flag(node, f"{name} with allow_pickle={ast.unparse(ap)}")
        elif name in ("eval", "exec", "builtins.eval", "builtins.exec", "__builtin__.eval"):
            flag(node, f"calls {name}()")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader")
            if loader is None and len(node.args) > 1:
                loader = node.args[1]
            if loader is None or _dotted(loader, aliases) not in SAFE_YAML_LOADERS:
                flag(node, f"{name} without a safe Loader")
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            flag(node, f"calls {name}()")
        elif name == "torch.jit.load":
            flag(node, "calls torch.jit.load()")
    return bad, stats


def package_sources():
    skip = {"tests", "web", "docs", "__pycache__"}
    venvs = {p.parent.name for p in REPO.glob("*/pyvenv.cfg")}      # e.g. CI's .venv-ci inside the repo
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        top = rel.parts[0]
        if top in skip or top in venvs or (top.startswith(".") and len(rel.parts) > 1) \
                or any(p.endswith(".egg-info") or p == "__pycache__" for p in rel.parts):
            continue
        yield rel.as_posix(), path.read_text(encoding="utf-8")


def test_static_no_unrestricted_deserialisation_in_the_pack():
    offenders, totals, files = [], {}, []
    for rel, src in package_sources():
        files.append(rel)
        bad, stats = scan_source(src, rel)
        offenders += bad
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
    # the walk saw the loaders (so a path mistake cannot make this vacuous)
    for must in ("classifiers/timm_classifier.py", "classifiers/clip_classifier.py", RESTRICTED_UNPICKLER_FILE,
                 "testbed/models.py"):
        assert must in files, must
    assert totals["torch.load weights_only=True"] >= 2 and totals["restricted unpickler"] == 1, totals
    assert not offenders, "unsafe deserialisation in the pack:\n" + "\n".join(offenders)


def test_static_checker_catches_every_pattern():
    bad_src = '''
import pickle, marshal
import numpy as np
import torch as T
import yaml
from torch import load as tload
from pickle import loads
x = pickle.load(open("f", "rb"))
y = pickle.loads(b"")
T.load("a.pt")
T.load("a.pt", weights_only=False)
tload("a.pt")
torch.serialization.load("a.pt")
np.load("a.npy", allow_pickle=True)
eval("1")
exec("1")
yaml.load("a")
yaml.load("a", Loader=yaml.Loader)
torch.jit.load("m.pt")
f = functools.partial(torch.load, weights_only=True)
u = pickle.Unpickler(open("f", "rb")).load()
class Mine(pickle.Unpickler):
    def find_class(self, m, n):
        return super().find_class(m, n)
    def persistent_load(self, pid):
        raise ValueError
'''
    bad, _ = scan_source(bad_src, "some/module.py")
    lines = {int(b.split(":")[1]) for b in bad}
    src_lines = bad_src.splitlines()
    expected = {i + 1 for i, ln in enumerate(src_lines)
                if any(t in ln for t in ("import pickle, marshal", "from pickle import loads", "pickle.load(",
                                         "pickle.loads(", "T.load(", "tload(", "serialization.load(",
                                         "allow_pickle=True", "eval(", "exec(", "yaml.load(", "jit.load(", "partial(torch.load",
                                         "pickle.Unpickler(open", "class Mine"))}
    assert expected <= lines, (sorted(expected - lines), bad)
    # and what the pack legitimately does passes
    good_src = '''
import torch, numpy as np, yaml
from safetensors import safe_open
torch.load("a.pt", map_location="cpu", weights_only=True)
np.load("a.npy")
np.load("a.npy", allow_pickle=False)
yaml.load("a", Loader=yaml.SafeLoader)
net.eval()
'''
    assert scan_source(good_src, "some/module.py")[0] == []
