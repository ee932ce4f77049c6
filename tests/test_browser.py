"""Every editor workflow opened in a real browser (Debian's headless Chromium driven by Playwright's
Python package with ``executable_path``: no browser download, no ``playwright install``) on a
ComfyUI server with the pack, in each frontend: the tree's own pinned ``comfyui-frontend-package``
(from its requirements.txt) and every frontend named in ``GFCG_FRONTENDS`` (folders made with
``pip install --target DIR comfyui-frontend-package==1.58.1``; ComfyUI serves it with
``--front-end-root``).

Checks per workflow: no missing node types; every saved link is live, into the same input; no
console errors from the pack; the layout as the frontend shows it: every node's box (pos, size and
the title bar above, ``node.getBounding()``) read from the live graph overlaps no other, no node
grew past its saved size (the frontend grows a node that is smaller than what it computes: then the
saved layout is wrong), the groups are there with titles and do not overlap, and a Note says what
to change first. A screenshot per workflow: GFCG_WRITE_DOCS=1 saves those of the newest frontend
to docs/screenshots/ (docs/workflows.md shows them) and a small JPEG of the graph as its template
thumbnail, workflows/<name>.jpg (what ComfyUI's template browser shows for a custom node's
workflow); GFCG_SCREENSHOTS=DIR keeps every frontend's. GFCG_WRITE_WORKFLOWS=1 records the sizes
this frontend computes for every node in tests/data/node_sizes.json (tests/workflow_layouts.py
lays the nodes out with them)."""
import io
import json
import math
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from conftest import COMFYUI, REPO, SKIP_REASON, comfyui_version, run_server

pytestmark = pytest.mark.comfy
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
EXTRA = [Path(p) for p in os.environ.get("GFCG_FRONTENDS", "").split(os.pathsep) if p]
SIZES_FILE = REPO / "tests" / "data" / "node_sizes.json"
GROW_TOLERANCE = 4          # px a live node may exceed its saved size by (rounding)
THUMB_MAX = (640, 400)      # the template thumbnail's largest size
THUMB_BYTES = 60_000


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


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
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]' "
                        "(the Python package only; it drives the system chromium, no 'playwright install')")
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
    (base / "in").mkdir()
    example = COMFYUI / "input" / "example.png"   # what the img2img workflow's Load Image names
    if example.is_file():
        shutil.copy(example, base / "in" / "example.png")
    cfg = base / "extra_model_paths.yaml"
    cfg.write_text(f"gfcg_browser:\n  base_path: {base}\n  custom_nodes: custom_nodes\n")
    with run_server(base, ["--extra-model-paths-config", str(cfg), *args]) as url:
        yield url, fe_version


def _settle_first_run(url):
    """A returning user's settings: no first-run template browser over the canvas, text drawn at
    every zoom (no level-of-detail boxes), no minimap, no canvas statistics, no missing-model
    warnings (the server has no model files)."""
    from conftest import api_post

    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Validation.Workflows", True),
                       ("LiteGraph.Canvas.MinFontSizeForLOD", 0), ("Comfy.Minimap.Visible", False),
                       ("Comfy.Graph.CanvasInfo", False), ("Comfy.ErrorSystem.ShowMissingModels", False),
                       ("Comfy.Workflow.ShowMissingModelsWarning", False)):
        try:
            api_post(url, f"/settings/{key}", value)
        except Exception:  # the endpoint answers with an empty body
            pass


CLOSE_DIALOGS = """() => { document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button')
                          .forEach(b => b.click()); return true; }"""

# the live graph: node boxes (with the title bar), sizes, what the frontend computes, groups, links
READ_GRAPH = """() => {
    const TH = LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = app.graph._nodes.map(n => ({
        id: n.id, type: n.type, title: n.title, pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
        computed: Array.from(n.computeSize()), collapsed: !!(n.flags && n.flags.collapsed),
        registered: !!LiteGraph.registered_node_types[n.type],
        text: n.type === 'Note' ? String((n.widgets_values || n.widgets?.map(w => w.value) || [''])[0] ?? '') : null,
        bounding: n.getBounding ? Array.from(n.getBounding()) : [n.pos[0], n.pos[1] - TH, n.size[0], n.size[1] + TH]}));
    const groups = (app.graph._groups || app.graph.groups || []).map(g => ({
        title: g.title, bounding: Array.from(g._bounding || g.bounding)}));
    const raw = app.graph.links;
    const all = raw instanceof Map ? [...raw.values()] : Object.values(raw || {});
    const byId = Object.fromEntries(app.graph._nodes.map(n => [n.id, n]));
    const links = all.filter(l => l).map(l => {
        const dst = byId[l.target_id];
        const inp = dst && dst.inputs ? dst.inputs[l.target_slot] : null;
        return [Number(l.origin_id), l.origin_slot, Number(l.target_id), inp ? inp.name : null];
    });
    return {titleHeight: TH, nodes, groups, links};
}"""

# the graph's extent on the screen (CSS px), for the thumbnail
SCREEN_BOX = """() => {
    const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
    const boxes = app.graph._nodes.map(n => n.getBounding ? Array.from(n.getBounding())
                                            : [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30])
        .concat((app.graph._groups || app.graph.groups || []).map(g => Array.from(g._bounding || g.bounding)));
    const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
    const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
    const sx = v => (v + ds.offset[0]) * ds.scale + r.left, sy = v => (v + ds.offset[1]) * ds.scale + r.top;
    return [sx(x0), sy(y0), sx(x1), sy(y1)];
}"""


def _overlap(a, b):
    """The area two [x, y, w, h] boxes share (0 where they only touch)."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0


def _thumbnail(png: bytes, box) -> bytes:
    """The graph's part of the screenshot, downscaled, as a JPEG of at most THUMB_BYTES."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    pad = 12
    crop = (max(0, int(box[0]) - pad), max(0, int(box[1]) - pad),
            min(img.width, int(math.ceil(box[2])) + pad), min(img.height, int(math.ceil(box[3])) + pad))
    if crop[2] - crop[0] > 50 and crop[3] - crop[1] > 50:
        img = img.crop(crop)
    img.thumbnail(THUMB_MAX, Image.LANCZOS)
    for quality in (85, 75, 65, 55, 45):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality, optimize=True, progressive=True)
        if buf.tell() <= THUMB_BYTES:
            break
    return buf.getvalue()


def _check_all(url, out_dir, thumb_dir):
    from playwright.sync_api import sync_playwright

    results = {}
    _settle_first_run(url)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 1200}, device_scale_factor=1)
            console = []
            page.on("console", lambda m: console.append(m.text) if m.type in ("error", "assert") else None)
            page.on("pageerror", lambda e: console.append(str(e)))
            page.goto(url)
            page.wait_for_function("() => !!(window.app && window.app.graph && window.LiteGraph)", timeout=120_000)
            page.wait_for_function("() => Object.keys(LiteGraph.registered_node_types).some(t => t.startsWith('GFCG'))",
                                   timeout=120_000)
            startup_errors = list(console)
            for path in WORKFLOWS:
                console.clear()
                wf = json.loads(path.read_text())
                page.evaluate("([wf, name]) => app.loadGraphData(wf, true, true, name).then(() => true)", [wf, path.stem])
                page.wait_for_timeout(1500)
                page.evaluate("() => (app.extensionManager?.command?.execute?.('Comfy.Canvas.FitView') ?? "
                              "Promise.resolve()).then(() => true)")
                page.wait_for_timeout(800)
                page.evaluate(CLOSE_DIALOGS)
                page.wait_for_timeout(500)
                png = page.screenshot()
                (out_dir / f"{path.stem}.png").write_bytes(png)
                thumb = _thumbnail(png, page.evaluate(SCREEN_BOX))
                (thumb_dir / f"{path.stem}.jpg").write_bytes(thumb)
                graph = page.evaluate(READ_GRAPH)   # after drawing: a node the frontend grew has grown
                results[path.stem] = dict(graph, errors=list(console), png=len(png), thumb=len(thumb))
        finally:
            browser.close()
    return startup_errors, results


def _newest(versions):
    return max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))


def _label(n):
    return f"{n['id']} {n['title'] or n['type']!r}"


def layout_problems(name, wf, graph):
    """What is wrong with a workflow's layout as the frontend shows it."""
    problems = []
    saved = {n["id"]: n for n in wf["nodes"]}
    live = graph["nodes"]
    for i, a in enumerate(live):
        for b in live[i + 1:]:
            if _overlap(a["bounding"], b["bounding"]) > 0:
                problems.append(f"{name}: nodes {_label(a)} and {_label(b)} overlap "
                                f"({[round(v) for v in a['bounding']]} and {[round(v) for v in b['bounding']]})")
    for n in live:
        s = saved.get(int(n["id"]))
        if s is None:
            continue
        if n["size"][0] > s["size"][0] + GROW_TOLERANCE or n["size"][1] > s["size"][1] + GROW_TOLERANCE:
            problems.append(f"{name}: the frontend grew node {_label(n)} from {s['size']} to "
                            f"{[round(v) for v in n['size']]} (it computes {[round(v) for v in n['computed']]})")
    groups = graph["groups"]
    if not groups:
        problems.append(f"{name}: no groups")
    for g in groups:
        if not (g["title"] or "").strip():
            problems.append(f"{name}: a group without a title at {g['bounding']}")
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if _overlap(a["bounding"], b["bounding"]) > 0:
                problems.append(f"{name}: groups {a['title']!r} and {b['title']!r} overlap")
    if not any((n["text"] or "").strip() for n in live if n["type"] == "Note"):
        problems.append(f"{name}: no Note node with a text")
    return problems


def _record_sizes(key, results):
    """tests/data/node_sizes.json: what this frontend (on this ComfyUI: ``key``) computes for every
    node, per workflow."""
    data = json.loads(SIZES_FILE.read_text()) if SIZES_FILE.is_file() else {}
    data.setdefault("frontends", {})[key] = {
        name: {str(n["id"]): [math.ceil(n["computed"][0]), math.ceil(n["computed"][1])]
               for n in sorted(r["nodes"], key=lambda n: int(n["id"]))}
        for name, r in sorted(results.items())}
    data["frontends"] = dict(sorted(data["frontends"].items()))
    data["about"] = ("node.computeSize() of every node of every editor workflow, per ComfyUI and frontend, measured "
                     "by tests/test_browser.py (GFCG_WRITE_WORKFLOWS=1); tests/workflow_layouts.py saves each "
                     "node at least this large (the largest over the frontends, plus a margin)")
    lines = ["{", f' "about": {json.dumps(data["about"])},', ' "frontends": {']
    for k, (version, per) in enumerate(data["frontends"].items()):   # one line per workflow
        lines.append(f"  {json.dumps(version)}: {{")
        rows = [f"   {json.dumps(name)}: {json.dumps(sizes)}" for name, sizes in sorted(per.items())]
        lines.append(",\n".join(rows))
        lines.append("  }" + ("," if k < len(data["frontends"]) - 1 else ""))
    lines += [" }", "}"]
    SIZES_FILE.parent.mkdir(parents=True, exist_ok=True)
    SIZES_FILE.write_text("\n".join(lines) + "\n")


def test_every_workflow_opens_in_the_browser(browser_env, tmp_path):
    url, fe_version = browser_env
    versions = [_target_version(p) for p in EXTRA]
    own_newest = not versions or fe_version == _newest(versions + [fe_version])
    out = thumbs = tmp_path / fe_version
    if os.environ.get("GFCG_WRITE_DOCS") and own_newest:
        out, thumbs = REPO / "docs" / "screenshots", REPO / "workflows"
    elif os.environ.get("GFCG_SCREENSHOTS"):   # keep every frontend's screenshots, e.g. for a review
        out = thumbs = Path(os.environ["GFCG_SCREENSHOTS"]) / f"{COMFYUI.name}-frontend-{fe_version}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"ComfyUI {COMFYUI.name}, frontend {fe_version}; screenshots in {out}, thumbnails in {thumbs}")
    startup_errors, results = _check_all(url, out, thumbs)
    if os.environ.get("GFCG_WRITE_WORKFLOWS"):
        _record_sizes("comfyui-%d.%d.%d/frontend-" % comfyui_version() + fe_version, results)
    pack_errors = [e for e in startup_errors if "gfcg" in e.lower()]
    assert not pack_errors, pack_errors
    problems = []
    for name, r in results.items():
        wf = json.loads((REPO / "workflows" / f"{name}.json").read_text())
        layout = layout_problems(name, wf, r)
        print(f"{name}: {len(r['nodes'])} nodes, {len(r['links'])} links, {len(r['groups'])} groups; "
              f"overlaps and grown nodes: {len(layout)}; thumbnail {r['thumb']} bytes; "
              f"console errors: {r['errors'][:3]}")
        missing = [n["type"] for n in r["nodes"] if not n["registered"]]
        assert missing == [], f"{name}: missing node types {missing}"
        assert len(r["nodes"]) == len(wf["nodes"]), name
        node_input = {n["id"]: n.get("inputs", []) for n in wf["nodes"]}
        saved_links = sorted([lk[1], lk[2], lk[3], node_input[lk[3]][lk[4]]["name"]] for lk in wf["links"])
        assert sorted(r["links"]) == saved_links, f"{name}: the live links are not the saved ones"
        assert not [e for e in r["errors"] if "gfcg" in e.lower()], f"{name}: {r['errors']}"
        assert r["png"] > 10_000, name
        assert 1_000 < r["thumb"] <= THUMB_BYTES, (name, r["thumb"])
        thumb = REPO / "workflows" / f"{name}.jpg"
        if thumb.is_file():   # where the template browser asks for it (mediaSubtype jpg for custom nodes)
            served = urllib.request.urlopen(f"{url}/api/workflow_templates/comfyui-gfcg/{name}.jpg", timeout=30)
            assert served.read() == thumb.read_bytes(), f"{name}: the served thumbnail is not workflows/{name}.jpg"
        problems += layout
    assert not problems, "\n".join(problems)


def test_the_layout_check_catches_overlaps_grown_nodes_and_missing_groups():
    """layout_problems on a made-up live graph (no browser): what the old layouts looked like, the
    GFCG Guider grown from its saved 300 x 200 to 300 x 450 over the node below it."""
    wf = {"nodes": [{"id": 1, "size": [300, 200]}, {"id": 2, "size": [300, 200]}]}
    guider = {"id": 1, "type": "GFCGGuider", "title": "GFCG Guider", "size": [300, 450], "computed": [228, 450],
              "bounding": [40, 10, 300, 480], "text": None}
    below = {"id": 2, "type": "BasicScheduler", "title": None, "size": [300, 200], "computed": [250, 106],
             "bounding": [40, 270, 300, 230], "text": None}
    problems = "\n".join(layout_problems("wf", wf, {"nodes": [guider, below], "groups": []}))
    for needle in ("nodes 1 'GFCG Guider' and 2 'BasicScheduler' overlap", "grew node 1", "no groups", "no Note"):
        assert needle in problems, (needle, problems)
    below["bounding"] = [40, 500, 300, 230]
    note = {"id": 3, "type": "Note", "title": "Start here", "size": [300, 100], "computed": [210, 88],
            "bounding": [400, 0, 300, 130], "text": "change the class first"}
    wf["nodes"] += [{"id": 3, "size": [300, 100]}]
    wf["nodes"][0]["size"] = [300, 450]
    groups = [{"title": "Guidance", "bounding": [20, -40, 340, 800]}]
    assert layout_problems("wf", wf, {"nodes": [guider, below, note], "groups": groups}) == []
