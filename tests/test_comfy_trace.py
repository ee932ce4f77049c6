"""Live trace over ComfyUI's server: progress text on the sampler node while sampling (the
websocket's binary TEXT events) and the trace plot IMAGE of the run, fetched through /view.
With GFCG_WRITE_DOCS=1 the plot is saved as docs/trace_testbed_gfcg_atg.png (the picture on the
README's front page and in docs/nodes.md)."""
import asyncio
import io
import json
import os
import struct
import urllib.request

import pytest

from conftest import REPO, api_wait, ws_prompt
from workflow_format import strip_meta

pytestmark = pytest.mark.comfy
TEXT_EVENT = 3   # ComfyUI's protocol.BinaryEventTypes.TEXT


async def _run_collecting(url, prompt, client_id="gfcg-trace-test", timeout=240):
    import aiohttp

    texts = []

    async def on_message(session, msg, pid):
        if msg.type == aiohttp.WSMsgType.BINARY:
            event, n = struct.unpack(">II", msg.data[:8])
            if event == TEXT_EVENT:
                texts.append((msg.data[8:8 + n].decode(), msg.data[8 + n:].decode()))
        elif msg.type == aiohttp.WSMsgType.TEXT:
            m = json.loads(msg.data)
            d = m.get("data", {})
            if m.get("type") == "executing" and d.get("node") is None and d.get("prompt_id") == pid:
                return True
            if m.get("type") == "execution_error":
                return True
        return False

    pid = await ws_prompt(url, prompt, client_id, on_message, timeout)
    return pid, texts


def test_progress_text_while_sampling_and_trace_plot_of_the_run(server):
    from PIL import Image

    url, _, _ = server
    prompt = strip_meta(json.loads((REPO / "workflows" / "api" / "testbed_gfcg_atg.json").read_text()))
    prompt["8"]["inputs"]["noise_seed"] = 11
    prompt["20"] = {"class_type": "GFCGTracePlot", "inputs": {"guider": ["7", 0], "samples": ["11", 0],
                                                              "width": 1000, "height": 560}}
    prompt["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "gfcg_trace"}}
    pid, texts = asyncio.run(_run_collecting(url, prompt))
    h = api_wait(url, pid)
    assert h["status"]["status_str"] == "success", h["status"]

    lines = [t for node, t in texts if node == "11"]          # shown on the SamplerCustomAdvanced node
    print("\n".join(lines[:4]))
    # one line per classifier step: the shipped graph classifies every `period`-th of its 18 steps
    # (1, 3, ..., 17 at period 2); settle_after only drops rows, the step still reports the rest
    period = prompt["6"]["inputs"]["period"]
    steps = [int(t.split()[1].split("/")[0]) for t in lines]
    assert all(t.split()[1].endswith("/18") for t in lines), lines
    assert steps == list(range(1, 19, period)), lines
    assert any("reference: " in t for t in lines) and all("p(desired)" in t for t in lines)

    img_info = h["outputs"]["21"]["images"][0]
    q = f"filename={img_info['filename']}&subfolder={img_info['subfolder']}&type={img_info['type']}"
    png = urllib.request.urlopen(f"{url}/view?{q}", timeout=30).read()
    img = Image.open(io.BytesIO(png))
    assert img.size == (1000, 560)
    if os.environ.get("GFCG_WRITE_DOCS"):
        (REPO / "docs").mkdir(exist_ok=True)
        (REPO / "docs" / "trace_testbed_gfcg_atg.png").write_bytes(png)
