"""The shipped workflows checked without ComfyUI: against the committed snapshots of the node schemas
they use, one per supported ComfyUI version (tests/data/workflow_schemas/<version>.json, each kept
current by test_workflows.py running on that version): node types, inputs, link types, widget
values; and the editor form reads back as the API form under every version's schemas. The editor
forms' layout as saved (no overlaps, groups, a Note, sizes the frontends keep, links left to
right) and each workflow's template thumbnail."""
import json

import pytest

from conftest import REPO
from workflow_format import check_against_schemas, link_problems, strip_meta, ui_to_api

SNAPS = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "tests" / "data" / "workflow_schemas").glob("*.json"))}
SNAP = SNAPS[max(SNAPS, key=lambda v: tuple(int(x) for x in v.split(".")))]   # the newest, for the negative test
NAMES = sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json"))


def test_a_snapshot_for_each_supported_comfyui():
    assert {"0.3.64", "0.33.0"} <= set(SNAPS), sorted(SNAPS)


@pytest.mark.parametrize("version", sorted(SNAPS))
@pytest.mark.parametrize("name", NAMES)
def test_workflow_against_the_schema_snapshot(name, version):
    snap = SNAPS[version]
    api = strip_meta(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
    assert check_against_schemas(api, snap) == []
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    assert ui_to_api(ui, snap) == api
    assert link_problems(ui, snap) == []


def test_the_check_catches_bad_workflows():
    api = strip_meta(json.loads((REPO / "workflows" / "api" / "testbed_gfcg_atg.json").read_text()))
    bad = json.loads(json.dumps(api))
    bad["6"]["inputs"]["tau"] = 1.5                       # out of range
    bad["6"]["inputs"]["reference"] = "random"            # not an option
    bad["11"]["inputs"]["guider"] = ["8", 0]              # a NOISE link into a GUIDER input
    bad["7"]["class_type"] = "GFCGCombinerX"              # unknown node type
    del bad["10"]["inputs"]["steps"]                      # required input missing
    problems = "\n".join(check_against_schemas(bad, SNAP))
    for needle in ("tau", "'random'", "NOISE link into a GUIDER", "unknown node type", "'steps' missing"):
        assert needle in problems, (needle, problems)


# ------------------------------------------------------------------------------------------------
# The editor forms' layout, as saved (tests/test_browser.py checks it again in the live frontend)

TITLE_HEIGHT = 30   # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar is drawn above its pos


def _box(node):
    return [node["pos"][0], node["pos"][1] - TITLE_HEIGHT, node["size"][0], node["size"][1] + TITLE_HEIGHT]


def _overlap(a, b):
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return w > 0 and h > 0


def _inside(inner, outer):
    return (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


@pytest.mark.parametrize("name", NAMES)
def test_editor_layout_reads_left_to_right_without_overlaps(name):
    """No two node boxes (title bar included) overlap, nor two groups; every node sits in a titled
    group; each link runs from left to right (or down a column); a Note says what to change first;
    every node is saved at least as large as every recorded frontend computes it
    (tests/data/node_sizes.json), so the editor keeps the layout."""
    from workflow_layouts import measured_sizes

    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    boxes = {nid: _box(n) for nid, n in nodes.items()}
    ids = sorted(boxes)
    overlaps = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if _overlap(boxes[a], boxes[b])]
    assert not overlaps, f"{name}: overlapping nodes {overlaps}"
    groups = ui["groups"]
    assert groups and all(g["title"].strip() for g in groups), name
    assert not [(a["title"], b["title"]) for i, a in enumerate(groups) for b in groups[i + 1:]
                if _overlap(a["bounding"], b["bounding"])]
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1, name
    lines = [ln for ln in notes[0]["widgets_values"][0].splitlines() if ln.strip()]
    assert 3 <= len(lines) <= 6, (name, lines)
    assert notes[0]["inputs"] == notes[0]["outputs"] == []
    for nid, n in nodes.items():
        if n["type"] != "Note":
            assert any(_inside(boxes[nid], g["bounding"]) for g in groups), f"{name}: node {nid} is in no group"
    for _, src, _, dst, _, _ in ui["links"]:
        a, b = nodes[src]["pos"], nodes[dst]["pos"]
        assert a[0] < b[0] or (a[0] == b[0] and a[1] < b[1]), f"{name}: link {src} -> {dst} runs backwards"
    for nid, (w, h) in measured_sizes(name).items():
        assert nid in nodes, f"{name}: tests/data/node_sizes.json measured node {nid}, which the workflow lacks"
        assert nodes[nid]["size"][0] >= w and nodes[nid]["size"][1] >= h, \
            f"{name}: node {nid} is saved at {nodes[nid]['size']}, a frontend computes {[w, h]}"
    assert set(measured_sizes(name)) == set(nodes), \
        f"{name}: no measured size for some nodes: rerun tests/test_browser.py with GFCG_WRITE_WORKFLOWS=1"


@pytest.mark.parametrize("name", NAMES)
def test_each_workflow_has_its_thumbnail(name):
    """workflows/<name>.jpg beside the editor form: what ComfyUI's template browser shows for a custom
    node's workflow (it asks for <name>.jpg). Written by tests/test_browser.py (GFCG_WRITE_DOCS=1)."""
    path = REPO / "workflows" / f"{name}.jpg"
    assert path.is_file(), f"no thumbnail {path.name}: run tests/test_browser.py with GFCG_WRITE_DOCS=1"
    data = path.read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and 1_000 < len(data) <= 60_000, (name, len(data))
    Image = pytest.importorskip("PIL.Image")
    import io

    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG" and 200 <= img.width <= 640 and 120 <= img.height <= 400, img.size


def test_the_workflows_folder_holds_editor_forms_and_their_thumbnails_only():
    files = sorted(p.name for p in (REPO / "workflows").iterdir() if p.is_file())
    assert files == sorted([f"{n}.json" for n in NAMES] + [f"{n}.jpg" for n in NAMES])


def test_text_references_differ_from_the_positive_only_in_the_class():
    """Every shipped text-model graph's reference template, with the desired class put in, is its
    positive prompt (for CLIP Text Encode (SDXL) both text_g and text_l, since the reference prompt goes
    to both of SDXL's encoders): D1 - D_ref then contrasts the class and nothing else of the prompt."""
    checked = 0
    for path in sorted((REPO / "workflows" / "api").glob("*.json")):
        api = json.loads(path.read_text())
        for node in api.values():
            inp = node["inputs"]
            if node["class_type"] != "GFCGGuider" or "clip" not in inp:
                continue
            positive = api[inp["positive"][0]]
            desired = inp["desired_class"]
            assert isinstance(desired, str), path.name
            reference = inp["prompt_template"].format(desired)
            if positive["class_type"] == "CLIPTextEncodeSDXL":
                # the reference is encoded with clip.tokenize(text): the same text for both encoders
                texts = [positive["inputs"]["text_g"], positive["inputs"]["text_l"]]
            else:
                assert positive["class_type"] == "CLIPTextEncode", (path.name, positive["class_type"])
                texts = [positive["inputs"]["text"]]
            assert texts == [reference] * len(texts), (path.name, texts, reference)
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("name", ["edm2_img512_s_gfcg_autoguidance", "edm2_img512_xxl_gfcg_autoguidance",
                                  "edm2_img512_s_img2img_gfcg", "testbed_gfcg_atg"])
def test_autoguidance_workflows_ship_the_measured_configuration(name):
    """The GFCG + ATG graphs set what the testbed chose and the latent cost benchmark measured
    (testbed/perf_latent.py SHIPPED, from bench.SHIPPED_ATG): swap (or auto, which is swap on
    autoguidance), its alpha / period / settling, and the decode defaults on latent models."""
    from comfyui_gfcg.testbed.perf_latent import SHIPPED

    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    guider = next(v["inputs"] for v in api.values() if v["class_type"] == "GFCGGuider")
    comb = next(v["inputs"] for v in api.values() if v["class_type"] == "GFCGCombiner")
    assert comb["combine_with"] == "autoguidance" and comb["mode"] in ("auto", SHIPPED["mode"])
    keys = ["tau", "alpha", "beta", "window_start", "window_end", "period", "settle_after"]
    if not name.startswith("testbed"):   # pixel-space testbed: nothing to decode
        keys += ["decode", "decode_resolution"]
    assert {k: guider[k] for k in keys} == {k: SHIPPED[k] for k in keys}


@pytest.mark.parametrize("version", sorted(SNAPS))
def test_engine_defaults_are_the_node_defaults(version):
    """GFCGConfig's defaults (the headless engine, the testbed's benchmark) are the GFCG Guider's
    and the Model Patch's node defaults, and the benchmark's stacking mode is what the Combiner's
    default (auto) gives on autoguidance."""
    import dataclasses

    from comfyui_gfcg.guiders.config import GFCGConfig
    from comfyui_gfcg.testbed.bench import Settings

    core = {f.name: f.default for f in dataclasses.fields(GFCGConfig)}
    fields = {"tau": "tau", "alpha": "alpha", "beta": "beta", "window_start": "window_start",
              "window_end": "window_end", "period": "period", "reference": "reference_mode",
              "classify_input": "classify_input", "temperature": "temperature", "settle_after": "settle_after"}
    for node_id in ("GFCGGuider", "GFCGModelPatch"):
        spec = SNAPS[version][node_id]["input"]
        inputs = {**spec["required"], **spec.get("optional", {})}
        for socket, field in fields.items():
            assert inputs[socket][1]["default"] == core[field], (node_id, socket)
    comb = SNAPS[version]["GFCGCombiner"]["input"]["required"]["mode"][1]["default"]
    from comfyui_gfcg.testbed.bench import stack_mode

    assert comb == "auto" and Settings().mode == "auto"
    assert stack_mode("gfcg+atg", "auto") == "swap" and stack_mode("gfcg+cfg", "auto") == "additive"
    from comfyui_gfcg.guiders.engine import COMBINE_MODES, resolve_mode    # the one rule both use

    spec = SNAPS[version]["GFCGCombiner"]["input"]["required"]["mode"]
    opts = spec[1]["options"] if spec[0] == "COMBO" else spec[0]       # 0.33.0 / 0.3.64 snapshot forms
    assert list(opts) == list(COMBINE_MODES)
    assert resolve_mode("atg", "additive") == "additive" and resolve_mode("cfg", "swap") == "swap"
