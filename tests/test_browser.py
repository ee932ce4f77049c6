"""Every editor workflow opened in a real browser (Debian's headless Chromium, no downloads) on a
ComfyUI server with the pack, in each frontend: the tree's own pinned ``comfyui-frontend-package``
(from its requirements.txt) and every frontend named in ``GFCG_FRONTENDS`` (folders made with
``pip install --target DIR comfyui-frontend-package==1.58.1``; ComfyUI serves it with
``--front-end-root``). Checks: no missing node types, no console errors from the pack, a
screenshot per workflow (GFCG_WRITE_DOCS=1 saves those of the newest frontend to docs/screenshots/,
which docs/workflows.md shows)."""
import asyncio
import contextlib
import json
import os
from pathlib import Path

import pytest

from cdp import Browser, find_chromium
from conftest import COMFYUI, REPO, SKIP_REASON, run_server

pytestmark = pytest.mark.comfy
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
EXTRA = [Path(p) for p in os.environ.get("GFCG_FRONTENDS", "").split(os.pathsep) if p]


def _target_version(folder: Path) -> str:
    """The comfyui-frontend-package version installed into a ``pip install --target`` folder."""
    info = sorted(folder.glob("comfyui_frontend_package-*.dist-info"))
    if not info:
        raise AssertionError(f"GFCG_FRONTENDS: {folder} holds no comfyui-frontend-package (pip install --target)")
    return info[-1].name[len("comfyui_frontend_package-"):-len(".dist-info")]


FRONTENDS = ["own"] + [str(p) for p in EXTRA]


@pytest.fixture(scope="module", params=FRONTENDS, ids=lambda f: "own" if f == "own" else f"frontend-{_target_version(Path(f))}")
def browser_env(request, tmp_path_factory):
    """(url, frontend version) of a server with the pack, serving the tree's own or a given frontend."""
    if COMFYUI is None:
        pytest.skip(SKIP_REASON)
    if find_chromium() is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    pytest.importorskip("aiohttp")
    if request.param == "own":
        try:
            from importlib.metadata import version

            import comfyui_frontend_package  # noqa: F401  (ComfyUI serves the editor from it)
        except ImportError:
            pytest.skip("comfyui-frontend-package is not installed (ComfyUI's requirements.txt)")
        fe_version, args = version("comfyui-frontend-package"), []
    else:
        folder = Path(request.param)
        fe_version = _target_version(folder)
        args = ["--front-end-root", str(folder / "comfyui_frontend_package" / "static")]
    base = tmp_path_factory.mktemp("browser_server")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO, base / "custom_nodes" / "comfyui-gfcg")
    cfg = base / "extra_model_paths.yaml"
    cfg.write_text(f"gfcg_browser:\n  base_path: {base}\n  custom_nodes: custom_nodes\n")
    with run_server(base, ["--extra-model-paths-config", str(cfg), *args]) as url:
        yield url, fe_version


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


def _newest(versions):
    return max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))


def test_every_workflow_opens_in_the_browser(browser_env, tmp_path):
    url, fe_version = browser_env
    versions = [_target_version(p) for p in EXTRA]
    own_newest = not versions or fe_version == _newest(versions + [fe_version])
    out = tmp_path / fe_version
    if os.environ.get("GFCG_WRITE_DOCS") and own_newest:
        out = REPO / "docs" / "screenshots"
    elif os.environ.get("GFCG_SCREENSHOTS"):   # keep every frontend's screenshots, e.g. for a review
        out = Path(os.environ["GFCG_SCREENSHOTS"]) / f"{COMFYUI.name}-frontend-{fe_version}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"ComfyUI {COMFYUI.name}, frontend {fe_version}; screenshots in {out}")
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
