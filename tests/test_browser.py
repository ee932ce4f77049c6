"""Every editor workflow opened in a real browser (Debian's headless Chromium, no downloads) on a
ComfyUI server with the pack and the comfyui-frontend-package: no missing node types, no console
errors from the pack, a screenshot per workflow (GFCG_WRITE_DOCS=1 saves them to docs/screenshots/,
the README's)."""
import asyncio
import json
import os

import pytest

from cdp import Browser, find_chromium
from conftest import REPO

pytestmark = pytest.mark.comfy
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def browser_env(server):
    if find_chromium() is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    pytest.importorskip("aiohttp")
    try:
        import comfyui_frontend_package  # noqa: F401  (ComfyUI serves the editor from it)
    except ImportError:
        pytest.skip("comfyui-frontend-package is not installed (ComfyUI's requirements.txt)")
    return server


def _settle_first_run(url):
    """A returning user's settings: no first-run template browser over the canvas, text drawn at
    every zoom (no level-of-detail boxes), no minimap."""
    from conftest import api_post

    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Validation.Workflows", True),
                       ("LiteGraph.Canvas.MinFontSizeForLOD", 0), ("Comfy.Minimap.Visible", False)):
        try:
            api_post(url, f"/settings/{key}", value)
        except Exception:  # the endpoint answers with an empty body
            pass


CLOSE_DIALOGS = """(() => { document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button')
                          .forEach(b => b.click()); return true; })()"""


async def _check_all(url, out_dir):
    results = {}
    _settle_first_run(url)
    async with Browser(1920, 1200) as b:
        await b.goto(url)
        await b.wait_for("!!(window.app && window.app.graph && window.LiteGraph)")
        await b.wait_for("Object.keys(LiteGraph.registered_node_types).some(t => t.startsWith('GFCG'))")
        startup_errors = list(b.console)
        for path in WORKFLOWS:
            b.console.clear()
            wf = json.loads(path.read_text())
            await b.eval(f"app.loadGraphData({json.dumps(wf)}, true, true, {json.dumps(path.stem)}).then(() => true)")
            await asyncio.sleep(1.5)
            info = await b.eval("""(() => {
                const types = app.graph._nodes.map(n => n.type);
                const missing = types.filter(t => !LiteGraph.registered_node_types[t]);
                const links = Object.keys(app.graph.links || {}).length || (app.graph.links?.size ?? 0);
                return {types, missing, n: types.length, links};
            })()""")
            await b.eval("(app.extensionManager?.command?.execute?.('Comfy.Canvas.FitView') ?? Promise.resolve()).then(() => true)")
            await asyncio.sleep(0.8)
            await b.eval(CLOSE_DIALOGS)
            await asyncio.sleep(0.5)
            png = await b.screenshot()
            (out_dir / f"{path.stem}.png").write_bytes(png)
            results[path.stem] = dict(info, errors=list(b.console), png=len(png))
    return startup_errors, results


def test_every_workflow_opens_in_the_browser(browser_env, tmp_path):
    url, _, _ = browser_env
    out = REPO / "docs" / "screenshots" if os.environ.get("GFCG_WRITE_DOCS") else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    startup_errors, results = asyncio.run(_check_all(url, out))
    pack_errors = [e for e in startup_errors if "gfcg" in e.lower()]
    assert not pack_errors, pack_errors
    for name, r in results.items():
        wf = json.loads((REPO / "workflows" / f"{name}.json").read_text())
        print(name, r["n"], "nodes,", r["links"], "links; console errors:", r["errors"][:3])
        assert r["missing"] == [], f"{name}: missing node types {r['missing']}"
        assert r["n"] == len(wf["nodes"]), name
        assert not [e for e in r["errors"] if "gfcg" in e.lower()], f"{name}: {r['errors']}"
        assert r["png"] > 10_000, name
