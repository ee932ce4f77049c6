"""The shipped workflows checked without ComfyUI (CI): against the committed snapshot of the node
schemas they use (tests/data/workflow_schemas.json, kept current by test_workflows.py where
ComfyUI is present): node types, inputs, link types, widget values; and the editor form converts
back to the API form."""
import json

import pytest

from conftest import REPO
from workflow_format import check_against_schemas, strip_meta, ui_to_api

SNAP = json.loads((REPO / "tests" / "data" / "workflow_schemas.json").read_text())
NAMES = sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json"))


@pytest.mark.parametrize("name", NAMES)
def test_workflow_against_the_schema_snapshot(name):
    api = strip_meta(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
    assert check_against_schemas(api, SNAP) == []
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    assert ui_to_api(ui, SNAP) == api


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
