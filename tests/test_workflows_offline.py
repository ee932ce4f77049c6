"""The shipped workflows checked without ComfyUI: against the committed snapshots of the node schemas
they use, one per supported ComfyUI version (tests/data/workflow_schemas/<version>.json, each kept
current by test_workflows.py running on that version): node types, inputs, link types, widget
values; and the editor form reads back as the API form under every version's schemas."""
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
