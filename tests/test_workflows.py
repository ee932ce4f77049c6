"""Every shipped workflow: the editor form is the API form (converted with the server's
/object_info, and back; its layout from tests/workflow_layouts.py), and ComfyUI's own prompt
validation accepts the API form -- node types, link types, widget values and file names -- with the
files users have (placeholders here). Every node of the pack is in at least one workflow, and
docs/workflows.md has the table of which (GFCG_WRITE_DOCS=1 rewrites it)."""
import asyncio
import json
import os
import urllib.request

import pytest

from conftest import REPO, comfyui_version
from workflow_format import api_to_ui, check_against_schemas, link_problems, schema_snapshot, strip_meta, ui_to_api
from workflow_layouts import layout_for

pytestmark = pytest.mark.comfy
API_DIR = REPO / "workflows" / "api"
NAMES = sorted(p.stem for p in API_DIR.glob("*.json"))
SNAPSHOTS = REPO / "tests" / "data" / "workflow_schemas"   # one per ComfyUI version, <version>.json

# the model files the workflows name, by ComfyUI folder (see docs/model_files.md)
FILES = {"checkpoints": ["v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"],
         "vae": ["vae-ft-mse-840000-ema-pruned.safetensors"],
         "gfcg_classifiers": ["resnet50.a1_in1k.safetensors"],
         "gfcg_clip": ["CLIP-ViT-B-32-laion2B-s34B-b79K.safetensors"],
         "edm2": ["edm2-img512-s-2147483-0.070.pkl", "edm2-img512-xs-0134217-0.125.pkl",
                  "edm2-img512-xxl-0939524-0.075.pkl", "edm2-img512-m-0268435-0.155.pkl",
                  "edm2-img64-s-1073741-0.075.pkl"]}


@pytest.mark.parametrize("name", NAMES)
def test_editor_form_matches_api_form(server, name):
    """Semantic, so that a workflow saved once opens in every supported ComfyUI: the committed editor
    form read with THIS ComfyUI's node schemas is the API form (same nodes, links and widget values),
    and each link's type is what this ComfyUI's nodes put out and take in. Layout, sizes and the
    outputs' cosmetic lists are the editor's business. GFCG_WRITE_WORKFLOWS=1 regenerates the form."""
    url, _, _ = server
    info = json.load(urllib.request.urlopen(url + "/object_info", timeout=60))
    api = json.loads((API_DIR / f"{name}.json").read_text())
    ui_path = REPO / "workflows" / f"{name}.json"
    if os.environ.get("GFCG_WRITE_WORKFLOWS"):
        ui_path.write_text(json.dumps(api_to_ui(api, info, layout_for(name)), indent=1) + "\n")
    committed = json.loads(ui_path.read_text())
    assert ui_to_api(committed, info) == strip_meta(api)
    assert link_problems(committed, info) == []


@pytest.fixture(scope="module")
def placeholder_files(env, tmp_path_factory):
    """Empty files with the users' file names in the folders ComfyUI lists them from (validation
    checks names, links and values; it does not open files)."""
    import folder_paths

    for key, names in FILES.items():
        folder = tmp_path_factory.mktemp(key)
        for n in names:
            (folder / n).write_bytes(b"")
        folder_paths.add_model_folder_path(key, str(folder))
    return FILES


@pytest.mark.parametrize("name", NAMES)
def test_comfyui_validates_the_workflow(env, placeholder_files, name):
    import execution

    prompt = strip_meta(json.loads((API_DIR / f"{name}.json").read_text()))
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("wf", prompt, None))
    assert valid, (error, node_errors)
    assert outputs, "the workflow has no output node"
    # and a wrong link is caught by the same validation (in every sampler: one valid output is enough)
    bad = json.loads(json.dumps(prompt))
    samplers = [v for v in bad.values() if v["class_type"] in ("SamplerCustomAdvanced", "KSampler")]
    assert samplers
    for v in samplers:
        if v["class_type"] == "SamplerCustomAdvanced":
            v["inputs"]["guider"] = v["inputs"]["noise"]          # a NOISE link into the GUIDER input
        else:
            v["inputs"]["model"] = v["inputs"]["positive"]        # a CONDITIONING link into the MODEL input
    assert not asyncio.run(execution.validate_prompt("wf", bad, None))[0]


def test_every_api_workflow_has_an_editor_form_and_nothing_else():
    assert NAMES == sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert len(NAMES) == 10


COVERAGE_START, COVERAGE_END = "<!-- node coverage: tests/test_workflows.py -->", "<!-- end of node coverage -->"


def coverage_table(nodes, used) -> str:
    """The markdown table: each node of the pack (display name, id) and the workflows it is in."""
    rows = ["| node | id | workflows |", "| --- | --- | --- |"]
    for nid, display in nodes:
        rows.append(f"| {display} | `{nid}` | " + ", ".join(f"`{w}`" for w in used[nid]) + " |")
    return "\n".join(rows)


def test_every_node_of_the_pack_is_in_a_workflow(env):
    """Each of the pack's nodes (ids from their V3 schemas) appears in at least one shipped workflow,
    and docs/workflows.md carries the table of which (GFCG_WRITE_DOCS=1 rewrites it)."""
    from comfyui_gfcg.nodes import NODES

    nodes = sorted(((cls.GET_SCHEMA().node_id, cls.GET_SCHEMA().display_name) for cls in NODES),
                   key=lambda n: n[1].lower())
    assert len(nodes) == 13
    used = {nid: [] for nid, _ in nodes}
    for name in NAMES:
        for t in sorted({n["class_type"] for n in json.loads((API_DIR / f"{name}.json").read_text()).values()}):
            if t in used:
                used[t].append(name)
    missing = [f"{d} ({nid})" for nid, d in nodes if not used[nid]]
    assert not missing, f"nodes in no workflow: {missing}"
    page = REPO / "docs" / "workflows.md"
    text = page.read_text()
    assert COVERAGE_START in text and COVERAGE_END in text, f"docs/workflows.md lacks the {COVERAGE_START} markers"
    head, rest = text.split(COVERAGE_START, 1)
    _, tail = rest.split(COVERAGE_END, 1)
    current = head + COVERAGE_START + "\n" + coverage_table(nodes, used) + "\n" + COVERAGE_END + tail
    if os.environ.get("GFCG_WRITE_DOCS"):
        page.write_text(current)
    assert page.read_text() == current, "docs/workflows.md's node coverage table is stale: rerun with GFCG_WRITE_DOCS=1"


def test_schema_snapshot_is_current_and_accepts_the_workflows(server):
    """The committed snapshot of THIS ComfyUI version (used by test_workflows_offline.py where ComfyUI
    is absent) equals what it serves; GFCG_WRITE_WORKFLOWS=1 writes it."""
    url, _, _ = server
    info = json.load(urllib.request.urlopen(url + "/object_info", timeout=60))
    apis = [json.loads((API_DIR / f"{n}.json").read_text()) for n in NAMES]
    snap = schema_snapshot(apis, info)
    path = SNAPSHOTS / ("%d.%d.%d.json" % comfyui_version())
    if os.environ.get("GFCG_WRITE_WORKFLOWS"):
        SNAPSHOTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    assert path.is_file(), f"no schema snapshot for this ComfyUI ({path.name}): rerun with GFCG_WRITE_WORKFLOWS=1"
    assert json.loads(path.read_text()) == json.loads(json.dumps(snap)), "stale: rerun with GFCG_WRITE_WORKFLOWS=1"
    for api in apis:
        assert check_against_schemas(strip_meta(api), snap) == []
