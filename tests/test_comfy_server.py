"""ComfyUI started as a server with the pack in custom_nodes: no import errors, every node in
/object_info with a description and a tooltip on every input."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import COMFYUI, REPO, SKIP_REASON

pytestmark = pytest.mark.comfy
PACK_NODES = ("GFCGLoadImageClassifier", "GFCGGuider", "GFCGCombiner")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if COMFYUI is None:
        pytest.skip(SKIP_REASON)
    base = tmp_path_factory.mktemp("comfy_server")
    custom = base / "custom_nodes"
    custom.mkdir()
    for sub in ("out", "tmp", "user"):
        (base / sub).mkdir()
    os.symlink(REPO, custom / "comfyui-gfcg")
    cfg = base / "extra_model_paths.yaml"
    cfg.write_text(f"gfcg_test:\n  base_path: {base}\n  custom_nodes: custom_nodes\n")
    port = _free_port()
    log = open(base / "server.log", "w")
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--extra-model-paths-config", str(cfg), "--output-directory", str(base / "out"),
           "--temp-directory", str(base / "tmp"), "--user-directory", str(base / "user"),
           "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--dont-print-server"]
    env = dict(os.environ, PYTHONPATH="")
    proc = subprocess.Popen(cmd, cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT, env=env)
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
        yield url, base / "server.log"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_pack_loads_without_import_errors(server):
    _, log = server
    text = log.read_text()
    pack_lines = [ln for ln in text.splitlines() if "comfyui-gfcg" in ln]
    assert not any("IMPORT FAILED" in ln or "Traceback" in ln for ln in pack_lines), text[-3000:]
    assert "Cannot import" not in "\n".join(pack_lines)


def test_object_info_has_every_node_with_tooltips(server):
    url, _ = server
    info = json.load(urllib.request.urlopen(url + "/object_info", timeout=30))
    for name in PACK_NODES:
        assert name in info, f"{name} missing from /object_info"
        node = info[name]
        assert node["description"].strip()
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp}: no tooltip"
        assert all(node.get("output_tooltips", [None]))
