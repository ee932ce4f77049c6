"""Soak and interrupt, through a real ComfyUI server's HTTP API with the shipped testbed workflow.

* 100 sequential prompts (each a new seed, so each really samples): the server's resident memory
  grows by at most 5 % after a warm-up of 10 prompts, and the number of models ComfyUI holds
  loaded (the pack's ``GET /gfcg/status``) stays the same.
* ``POST /interrupt`` in the middle of sampling: the prompt ends as interrupted, the server keeps
  serving, and the same prompt run again gives a latent bit-identical to an uninterrupted run.
Bounded in time (asserted); runs when a ComfyUI checkout is present.
"""
import asyncio
import json
import time
import urllib.request

import pytest

from conftest import api_submit, make_testbed_prompt, ws_prompt

pytestmark = pytest.mark.comfy
N, WARMUP = 100, 10
SAMPLER = "11"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def gfcg_status(url) -> dict:
    return json.load(urllib.request.urlopen(url + "/gfcg/status", timeout=10))


def test_soak_100_prompts_memory_and_models_flat(server):
    url, _, base = server
    pid = int((base / "server.pid").read_text())
    t0 = time.time()
    rss, counts, seconds = [], [], []
    for i in range(N):
        t = time.time()
        stage, h = api_submit(url, make_testbed_prompt(steps=6, batch=2, seed=50_000 + i, prefix="soak"))
        assert stage == "success", f"prompt {i}: {h}"
        seconds.append(time.time() - t)
        rss.append(rss_mb(pid))
        counts.append(gfcg_status(url)["loaded_model_count"])
    total = time.time() - t0
    ref = rss[WARMUP - 1]
    growth = (max(rss[WARMUP:]) - ref) / ref
    print(f"\nsoak: {N} prompts in {total:.0f} s (median {sorted(seconds)[N // 2]:.2f} s, max {max(seconds):.2f} s each); RSS after warm-up "
          f"{ref:.0f} MB, max after {max(rss[WARMUP:]):.0f} MB, last {rss[-1]:.0f} MB: growth {100 * growth:+.2f} %; "
          f"loaded models {sorted(set(counts[WARMUP:]))} (first prompts {counts[:WARMUP]})")
    assert growth <= 0.05
    assert len(set(counts[WARMUP:])) == 1 and counts[-1] >= 3     # main, guide and classifier stay loaded
    assert total < 900


async def _interrupt_mid_sampling(url, prompt, client_id="gfcg-soak-interrupt", at_step=3, timeout=300):
    """Post ``prompt``, POST /interrupt once the sampler reports step ``at_step``; the prompt id and
    the sampler progress seen when interrupting."""
    import aiohttp

    seen = {}

    async def on_message(session, msg, pid):
        if msg.type != aiohttp.WSMsgType.TEXT:
            return False
        m = json.loads(msg.data)
        d = m.get("data", {})
        if d.get("prompt_id") != pid:
            return False
        if m["type"] == "progress" and d.get("node") == SAMPLER and "value" not in seen and d["value"] >= at_step:
            seen.update(value=d["value"], max=d["max"])
            async with session.post(url + "/interrupt", json={}) as r2:
                assert r2.status == 200
        if m["type"] in ("execution_interrupted", "execution_error", "execution_success"):
            seen["end"] = m["type"]
            return True
        return False

    pid = await ws_prompt(url, prompt, client_id, on_message, timeout)
    return pid, seen


def _latent(base, h):
    from safetensors.torch import load_file

    lat = next(o["latents"][0] for o in h["outputs"].values() if "latents" in o)
    return load_file(str(base / "out" / lat["subfolder"] / lat["filename"]))["latent_tensor"]


def test_interrupt_mid_sampling_then_identical_rerun(server):
    url, _, base = server
    t0 = time.time()

    def prompt(seed):
        p = make_testbed_prompt(steps=18, batch=8, seed=seed, prefix="interrupt")
        p["99"] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0], "filename_prefix": "interrupt"}}
        return p

    stage, h = api_submit(url, prompt(7))                     # uninterrupted reference run
    assert stage == "success", h
    reference = _latent(base, h)
    before = gfcg_status(url)["loaded_model_count"]
    stage, h = api_submit(url, prompt(8))                     # another seed: the sampler's cache moves on
    assert stage == "success", h

    pid, seen = asyncio.run(_interrupt_mid_sampling(url, prompt(7)))
    hist = json.load(urllib.request.urlopen(f"{url}/history/{pid}", timeout=30)).get(pid, {})
    print(f"\ninterrupt: at sampler step {seen.get('value')}/{seen.get('max')}, ended with {seen.get('end')}; "
          f"history status {hist.get('status', {}).get('status_str')}")
    assert seen.get("end") == "execution_interrupted" and seen["value"] < seen["max"]
    urllib.request.urlopen(url + "/system_stats", timeout=10)   # still serving
    assert gfcg_status(url)["loaded_model_count"] == before

    stage, h = api_submit(url, prompt(7))                     # the same prompt again, now to the end
    assert stage == "success", h
    assert not any(m[0] == "execution_cached" and SAMPLER in m[1]["nodes"] for m in h["status"]["messages"])
    again = _latent(base, h)
    res = make_testbed_prompt()["5"]["inputs"]["resolution"]
    assert again.shape == reference.shape == (8, 3, res, res)
    assert (again == reference).all(), f"max |difference| {(again - reference).abs().max().item()}"
    assert time.time() - t0 < 600
