"""Test setup. ComfyUI integration tests run when a ComfyUI tree is found (``COMFYUI_PATH``, the shared
read-only tree ``../shared/comfyui/0.33.0`` (copied to the temp folder first), ``../ComfyUI`` beside
the repo, or the repo sitting in ``ComfyUI/custom_nodes``) and skip with the reason otherwise."""
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The repo root is the pack itself (it has nodes/, __init__.py ...). It must never be on sys.path as
# a plain folder, or its ``nodes`` package would shadow ComfyUI's top-level ``nodes`` module; tests
# import the pack as ``comfyui_gfcg`` (pip install -e .).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]


SHARED_TREES = REPO.parent / "shared" / "comfyui"   # unmodified trees laid read-only (CI, developers)
DEFAULT_TREE = "0.33.0"


def _is_shared(path: Path) -> bool:
    """A tree that must not be written to: one of the shared read-only trees, or a read-only folder."""
    try:
        path.relative_to(SHARED_TREES.resolve())
        return True
    except ValueError:
        return not os.access(path, os.W_OK)


def _working_copy(src: Path) -> Path:
    """A writable copy of a read-only ComfyUI tree (ComfyUI writes its user, output and temp folders
    and __pycache__ into its own tree), made once per tree and machine in the temp folder."""
    import hashlib
    import shutil
    import tempfile

    tag = hashlib.sha1(str(src).encode()).hexdigest()[:10]
    dst = Path(tempfile.gettempdir()) / f"gfcg-comfyui-{src.name}-{tag}"
    done = dst / ".gfcg-copied"
    if not done.is_file():
        tmp = dst.with_name(dst.name + f".part{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("__pycache__", ".git"))
        for d, dirs, files in os.walk(tmp):   # the copy is ours to write
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        (tmp / ".gfcg-copied").write_text(str(src))
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    return dst


def find_comfyui():
    """The ComfyUI tree the integration tests use: COMFYUI_PATH, else ../shared/comfyui/0.33.0, else
    ../ComfyUI, else the ComfyUI this repo sits in (custom_nodes/). Read-only trees are copied first."""
    cands = [os.environ.get("COMFYUI_PATH"), str(SHARED_TREES / DEFAULT_TREE), str(REPO.parent / "ComfyUI"),
             str(REPO.parents[1])]
    for c in cands:
        if c and (Path(c) / "comfy" / "samplers.py").is_file():
            path = Path(c).resolve()
            return _working_copy(path) if _is_shared(path) else path
    return None


def comfyui_version():
    """The tree's version (comfyui_version.py), e.g. (0, 33, 0); None without a tree."""
    if COMFYUI is None:
        return None
    import re

    m = re.search(r'__version__\s*=\s*"(\d+)\.(\d+)\.(\d+)', (COMFYUI / "comfyui_version.py").read_text())
    return tuple(int(g) for g in m.groups()) if m else None


COMFYUI = find_comfyui()
SKIP_REASON = ("no ComfyUI tree found: set COMFYUI_PATH, or lay the shared trees at "
               f"{SHARED_TREES} or a Comfy-Org/ComfyUI checkout at {REPO.parent / 'ComfyUI'} "
               "(its requirements installed in this environment)")

_state = {}

# The device the ComfyUI tests run on: "cpu" (default; CI) or "cuda" (GFCG_TEST_DEVICE=cuda, a GPU
# machine: ComfyUI picks its device as a user's server does, DynamicVRAM included).
TEST_DEVICE = os.environ.get("GFCG_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if TEST_DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"GFCG_TEST_DEVICE={TEST_DEVICE!r}: use cpu or cuda")
ON_GPU = TEST_DEVICE == "cuda"


def tol(cpu: float, cuda: float) -> float:
    """A comparison's tolerance on the device the tests run on (``cuda`` may be looser: TF32 matmuls,
    other kernels; never ``cpu`` looser than it was)."""
    return cuda if ON_GPU else cpu


def server_device_args():
    """ComfyUI's command-line arguments for the test device, and a stand-in frontend folder where
    ``comfyui_frontend_package`` is missing (a GPU machine without network)."""
    extra = [] if ON_GPU else ["--cpu"]
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        import tempfile

        fe = Path(tempfile.gettempdir()) / "gfcg-stand-in-frontend"
        fe.mkdir(exist_ok=True)
        (fe / "index.html").write_text("<html><body>stand-in frontend (tests)</body></html>")
        extra += ["--front-end-root", str(fe)]
    return extra


def load_comfy():
    """Import ComfyUI on the test device (the CPU unless GFCG_TEST_DEVICE=cuda) and load this pack
    into its node registry (once per session)."""
    if "nodes" in _state:
        return _state
    if COMFYUI is None:
        pytest.skip(SKIP_REASON)
    if str(COMFYUI) not in sys.path:
        sys.path.insert(0, str(COMFYUI))
    from comfy.cli_args import args

    args.cpu = not ON_GPU
    import comfy.model_management  # noqa: F401  (after args.cpu)
    import nodes as comfy_nodes

    if "SamplerCustomAdvanced" not in comfy_nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(comfy_nodes.init_builtin_extra_nodes())
    if "GFCGGuider" not in comfy_nodes.NODE_CLASS_MAPPINGS:
        ok = asyncio.run(comfy_nodes.load_custom_node(str(REPO)))
        assert ok, "ComfyUI failed to load the pack (see the log)"
    _state["nodes"] = comfy_nodes
    return _state


@pytest.fixture(scope="session")
def comfy():
    return load_comfy()


# ----------------------------------------------------------------------------------------------
# A real ComfyUI server, for the HTTP API tests


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A ComfyUI server (--cpu) with the pack in custom_nodes and a yaml-added models/edm2 folder holding
    a tiny NVlabs-format img64 net and a malicious pickle; yields (url, log path, base folder)."""
    import edm2_helpers as H

    if COMFYUI is None:
        pytest.skip(SKIP_REASON)
    base = tmp_path_factory.mktemp("comfy_server")
    custom = base / "custom_nodes"
    custom.mkdir()
    for sub in ("out", "tmp", "user"):
        (base / sub).mkdir()
    os.symlink(REPO, custom / "comfyui-gfcg")
    edm2_dir = base / "models" / "edm2"
    edm2_dir.mkdir(parents=True)
    tiny = H.small_cfg("img64", 1000)
    (edm2_dir / "edm2-img64-tiny.pkl").write_bytes(H.nvlabs_pickle_bytes(tiny, H.random_state_dict(tiny), base / "SENTINEL", "rgb"))
    (edm2_dir / "edm2-evil.pkl").write_bytes(b"cos\nsystem\n(S'touch " + str(base / "SENTINEL").encode() + b"'\ntR.")
    cfg = base / "extra_model_paths.yaml"
    for sub in ("vae", "checkpoints", "gfcg_classifiers", "gfcg_clip", "vae_approx"):
        (base / "models" / sub).mkdir(parents=True)
    (base / "in").mkdir()
    cfg.write_text(f"gfcg_test:\n  base_path: {base}\n  custom_nodes: custom_nodes\n  edm2: models/edm2\n"
                   f"  vae: models/vae\n  checkpoints: models/checkpoints\n  gfcg_classifiers: models/gfcg_classifiers\n"
                   f"  gfcg_clip: models/gfcg_clip\n  vae_approx: models/vae_approx\n")
    with run_server(base, ["--extra-model-paths-config", str(cfg)]) as url:
        yield url, base / "server.log", base


@contextlib.contextmanager
def run_server(base: Path, extra_args=()):
    """A ComfyUI server (--cpu unless GFCG_TEST_DEVICE=cuda) on a free loopback port with its writable folders under ``base``
    (out, tmp, in, user; made here) and ``extra_args``; yields its URL, log in base/server.log."""
    for sub in ("out", "tmp", "user", "in"):
        (base / sub).mkdir(exist_ok=True)
    port = _free_port()
    log = open(base / "server.log", "w")
    cmd = [sys.executable, "main.py", *server_device_args(), "--listen", "127.0.0.1", "--port", str(port),
           "--output-directory", str(base / "out"), "--temp-directory", str(base / "tmp"),
           "--input-directory", str(base / "in"), "--user-directory", str(base / "user"),
           "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--dont-print-server", *extra_args]
    # the repo root must not shadow ComfyUI's modules; other PYTHONPATH entries (a GPU machine's
    # extra site folder) stay
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(keep))
    proc = subprocess.Popen(cmd, cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT, env=env)
    (base / "server.pid").write_text(str(proc.pid))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited: {(base / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/system_stats", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("ComfyUI did not start within 180 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def api_post(url, path, payload):
    req = urllib.request.Request(url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))


def api_wait(url, prompt_id, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = json.load(urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=30))
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            return hist[prompt_id]
        time.sleep(1)
    pytest.fail("prompt did not finish")


def view_image(url, info):
    """An output image of a finished prompt, fetched through ComfyUI's /view."""
    import io

    from PIL import Image

    q = f"filename={info['filename']}&subfolder={info['subfolder']}&type={info['type']}"
    return Image.open(io.BytesIO(urllib.request.urlopen(f"{url}/view?{q}", timeout=30).read()))


def small_text_prompt(name, size=64, steps=2):
    """A shipped text-to-image workflow (API form) at ``size`` x ``size``, batch 1, ``steps`` steps."""
    from workflow_format import strip_meta

    prompt = strip_meta(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
    for v in prompt.values():
        if v["class_type"] == "EmptyLatentImage":
            v["inputs"].update(width=size, height=size, batch_size=1)
        if v["class_type"] == "BasicScheduler":
            v["inputs"]["steps"] = steps
    return prompt


def one_reference_on_cpu(prompt, reference_class):
    """On the CPU, a text workflow's GFCG nodes switched to one fixed reference class: before sampling
    the guider encodes every reference prompt the run can need (all classes but the desired one for
    the runner-up mode), which for a 1000-class classifier and a full-size text encoder is minutes on
    two CPU cores (seconds on a GPU). The encode-all path itself is tested with tiny CLIPs
    (test_comfy_memory). On a GPU (GFCG_TEST_DEVICE=cuda) the workflow runs as shipped."""
    if ON_GPU:
        return prompt
    for v in prompt.values():
        if v["class_type"] == "GFCGGuider":
            v["inputs"].update(reference="fixed", fixed_reference_class=reference_class)
    return prompt


def make_testbed_prompt(steps=2, batch=1, seed=0, prefix="gfcg_api"):
    """The shipped testbed workflow (API form) with fewer steps, another batch size and seed."""
    from workflow_format import strip_meta

    p = strip_meta(json.loads((REPO / "workflows" / "api" / "testbed_gfcg_atg.json").read_text()))
    p["10"]["inputs"]["steps"] = steps
    p["5"]["inputs"]["batch_size"] = batch
    p["8"]["inputs"]["noise_seed"] = seed
    p["14"]["inputs"]["filename_prefix"] = prefix
    return p


async def ws_prompt(url, prompt, client_id, on_message, timeout=300):
    """Post ``prompt`` with ComfyUI's websocket open (as ``client_id``) and hand every message to
    ``await on_message(session, msg, prompt_id)`` until it returns True; returns the prompt id."""
    import asyncio

    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http", "ws") + f"/ws?clientId={client_id}") as ws:
            async with session.post(url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                pid = (await r.json())["prompt_id"]

            async def pump():
                async for msg in ws:
                    if await on_message(session, msg, pid):
                        return
            await asyncio.wait_for(pump(), timeout)
    return pid


def validation_text(body: dict) -> str:
    """ComfyUI's HTTP 400 answer as text: the error, then each node error with its input name."""
    parts = [body.get("error", {}).get("message", ""), body.get("error", {}).get("details", "")]
    for nid, ne in body.get("node_errors", {}).items():
        for e in ne.get("errors", []):
            parts.append(f"[{ne.get('class_type')} {nid}] {e.get('message')}: {e.get('details')} "
                         f"(input {e.get('extra_info', {}).get('input_name')})")
    return "\n".join(p for p in parts if p)


def api_submit(url, prompt, timeout=240):
    """('validation', text) | ('execution', exception message) | ('success', history entry)."""
    try:
        pid = api_post(url, "/prompt", {"prompt": prompt})["prompt_id"]
    except urllib.error.HTTPError as e:
        return "validation", validation_text(json.loads(e.read().decode()))
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = json.load(urllib.request.urlopen(f"{url}/history/{pid}", timeout=30))
        h = hist.get(pid)
        if h and h.get("status", {}).get("completed") is not None:
            if h["status"]["status_str"] == "success":
                return "success", h
            errs = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
            return "execution", "\n".join(f"[{e['node_type']} {e['node_id']}] {e['exception_type']}: "
                                           f"{e['exception_message']}" for e in errs) or json.dumps(h["status"])
        time.sleep(0.1)
    pytest.fail("prompt did not finish")


# ---------------------------------------------------------------- in-process ComfyUI helpers
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    st = load_comfy()
    import folder_paths

    import comfy_models as cm

    folder = tmp_path_factory.mktemp("classifiers")
    cm.save_classifier(str(folder))
    cm.save_classifier(str(folder), name="no_arch.safetensors", metadata=False)
    folder_paths.add_model_folder_path("gfcg_classifiers", str(folder))
    reg = st["nodes"].NODE_CLASS_MAPPINGS
    clf = reg["GFCGLoadImageClassifier"].execute("tiny_resnet.safetensors", "").result[0]
    return dict(reg=reg, cm=cm, clf=clf, folder=folder)


def node(env, name, **kw):
    return env["reg"][name].execute(**kw).result[0]


def sample(guider, seed=1, sampler="euler", steps=6, batch=2, size=16, channels=3):
    import torch

    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "karras", steps)
    latent = {"samples": torch.zeros(batch, channels, size, size)}
    with torch.inference_mode():
        out, _ = SamplerCustomAdvanced().sample(Noise_RandomNoise(seed), guider, comfy.samplers.sampler_object(sampler),
                                                sigmas, latent)
    return out["samples"]
