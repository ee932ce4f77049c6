"""Hand-made editor layouts of the shipped workflows (tests/workflow_format.py's api_to_ui places the
nodes with them; GFCG_WRITE_WORKFLOWS=1 in tests/test_workflows.py writes the editor forms).

A layout reads left to right: columns of titled groups (loaders, conditioning, guidance, sampling,
decode and outputs), each group a small grid of node columns, nodes stacked top-down. Positions
follow from the node sizes, so boxes never overlap: each node's size is at least what the editor
computes for it (``node.computeSize()``, measured in every frontend the browser test opens and kept
in tests/data/node_sizes.json, GFCG_WRITE_WORKFLOWS=1 in tests/test_browser.py rewrites it) plus a
margin, so the frontend keeps the saved size. A node box includes its title bar, drawn
``TITLE_HEIGHT`` above ``pos``. Every graph gets a Note (the frontend's own ``Note`` node: no
sockets, not in the API form) at the top left that says what to change first."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SIZES_FILE = Path(__file__).resolve().parent / "data" / "node_sizes.json"

TITLE_HEIGHT = 30        # LiteGraph.NODE_TITLE_HEIGHT: the title bar above a node's pos
GROUP_TITLE = 40         # a group's title bar (30 in frontend 1.58, 24 px font * 1.4 in older ones)
GROUP_PAD = 20           # between a group's border and the boxes inside
GROUP_GAP = 40           # between groups stacked in one column
COLUMN_GAP = 90          # between the columns of groups: room for the links
INNER_GAP = 50           # between node columns inside a group
NODE_GAP = 24            # between a node's bottom and the next title bar
MARGIN = (20, 10)        # added to the measured size (width, height)
NOTE_WIDTH = 460
GROUP_FONT = 24          # a group title's font size (the title must fit in the group's width)

# group colours: LiteGraph's group palette (LGraphCanvas.node_colors[...].groupcolor)
COLORS = {"models": "#3f789e", "conditioning": "#b58b2a", "guidance": "#a1309b", "sampling": "#88A",
          "output": "#8A8", "trace": "#b06634"}


@dataclass
class Group:
    title: str
    members: list            # node ids (one column) or lists of node ids (columns side by side)
    role: str                # a key of COLORS
    align: str | None = None  # start no higher than the top of this (earlier) group


@dataclass
class Layout:
    columns: list            # columns of Groups, left to right
    note: str                # the Note's text: what to change first
    min_size: dict = field(default_factory=dict)   # node id -> (w, h): room for images


PROMPT = (340, 150)        # a prompt box with room for a few lines


def _output_sizes(extra=None):
    """Room for the images: Save Image (14) and the trace's Preview Image (16), and ``extra``."""
    return {14: (340, 360), 16: (440, 320), **(extra or {})}


STARTS = "Start here. Change these first:"

_SD15_COLUMNS = [
    [Group("Models", [1, 2, 5], "models")],
    [Group("Prompts", [3, 4], "conditioning"), Group("Latent", [6], "conditioning")],
    [Group("GFCG + CFG", [7, 8], "guidance")],
    [Group("Sampling", [[9, 10, 11], [12]], "sampling")],
    [Group("Decode and save", [13, 14], "output"), Group("What the classifier saw", [15, 16], "trace")],
]

_EDM2_COLUMNS = [
    [Group("Models (main, guide, classifier, VAE)", [1, 2, 3, 6], "models")],
    [Group("Class and latent", [4, 5], "conditioning")],
    [Group("GFCG + autoguidance", [7, 8], "guidance")],
    [Group("Sampling (EDM2: Heun, 32 steps)", [[9, 10, 11], [12]], "sampling")],
    [Group("Decode and save", [13, 14], "output"), Group("What the classifier saw", [15, 16], "trace")],
]


def _edm2_note(model, guide, weight):
    return "\n".join([
        STARTS,
        "- desired_class (GFCG Guider) and class_name (EDM2 Class Label): the ImageNet class, now golden retriever;"
        " keep the two the same.",
        "- tau 0.5: samples the classifier is at least this sure of get no push; 0 turns GFCG off.",
        "- alpha 4; period 2 and settle_after 4 classify less (the testbed: same precision, 8 calls "
        "instead of 18); period 1 and settle_after 0 classify every step.",
        f"- GFCG Combiner: mode auto = swap (autoguidance's cost); scale {weight} is the "
        f"published autoguidance weight for {model} with its {guide} guide.",
        "- decode auto: TAESD from models/vae_approx if there, else the VAE (slower), at the classifier's size.",
    ])


LAYOUTS = {
    "sd15_gfcg_cfg": Layout(_SD15_COLUMNS, "\n".join([
        STARTS,
        "- desired_class (GFCG Guider): the ImageNet class you want, now golden retriever; name it in the "
        "positive prompt too.",
        "- tau 0.5: samples the classifier is at least this sure of get no push; 0 turns GFCG off.",
        "- alpha 8: the largest extra push, for samples the classifier doubts most; lower it if images break up.",
        "- GFCG Combiner: mode additive (one more branch) or swap (CFG's cost); scale 7.5 is the CFG scale.",
    ]), _output_sizes({3: PROMPT, 4: PROMPT})),
    "sd15_gfcg_zero_shot": Layout([
        [Group("Models", [1, 2], "models"), Group("Zero-shot classifier (open_clip)", [3], "models")],
        [Group("Prompts", [4, 5], "conditioning"), Group("Latent", [6], "conditioning")],
        [Group("GFCG + CFG", [7, 8], "guidance")],
        [Group("Sampling", [[9, 10, 11], [12]], "sampling")],
        [Group("Decode and save", [13, 14], "output"), Group("What the classifier saw", [15, 16], "trace")],
    ], "\n".join([
        STARTS,
        "- class_list (Load Zero-Shot Classifier): your classes, one a line; commas add synonyms.",
        "- desired_class (GFCG Guider): one of them, now corgi; the runner-up is what GFCG pushes away from.",
        "- tau 0.5 (0 = off) and alpha 8 (the largest extra push): with few classes p is high, so raise tau.",
        "- GFCG Combiner: mode additive or swap; scale 7.5 is the CFG scale.",
    ]), _output_sizes({3: (460, 480), 4: PROMPT, 5: PROMPT})),
    "edm2_img512_s_gfcg_autoguidance": Layout(_EDM2_COLUMNS, _edm2_note("EDM2-S", "XS", 2.1), _output_sizes()),
    "edm2_img512_xxl_gfcg_autoguidance": Layout(_EDM2_COLUMNS, _edm2_note("EDM2-XXL", "M", 2.05), _output_sizes()),
    "edm2_img64_gfcg_cfg": Layout([
        [Group("Models (main, classifier, VAE)", [1, 3, 6], "models")],
        [Group("Class labels and latent", [4, 2, 5], "conditioning")],
        [Group("GFCG + CFG", [7, 8], "guidance")],
        [Group("Sampling (EDM2: Heun, 32 steps)", [[9, 10, 11], [12]], "sampling")],
        [Group("Decode and save", [13, 14], "output"), Group("What the classifier saw", [15, 16], "trace")],
    ], "\n".join([
        STARTS,
        "- desired_class (GFCG Guider) and class_name (the upper EDM2 Class Label): the class, now golden "
        "retriever; keep the two the same.",
        "- tau 0.5: samples the classifier is at least this sure of get no push; 0 turns GFCG off.",
        "- alpha 8: the largest extra push for a confused sample.",
        "- GFCG Combiner: mode additive or swap; keep the CFG scale low (1.5): the empty label is no trained "
        "unconditional branch.",
    ]), _output_sizes()),
    "edm2_img512_s_img2img_gfcg": Layout([
        [Group("Models (main, guide, classifier, VAE)", [1, 2, 3, 4], "models")],
        [Group("Your image", [7, 8, 9], "conditioning"), Group("Class", [5, 6], "conditioning")],
        [Group("GFCG + autoguidance", [10, 11], "guidance")],
        [Group("Sampling (denoise 0.6)", [[12, 13, 14], [15]], "sampling")],
        [Group("Decode and save", [16, 17], "output"), Group("What the classifier saw", [18, 19], "trace")],
    ], "\n".join([
        STARTS,
        "- Load Image: your picture (any size; scaled to 512 x 512).",
        "- ImageNet Class: the class, by name (type to search); it feeds the class label and the GFCG Guider.",
        "- denoise 0.6 (BasicScheduler): how much of the picture is redrawn; 1 = all of it.",
        "- tau 0.5 (0 = GFCG off), alpha 4 (the largest push), period 2; Combiner mode auto (= swap).",
    ]), {7: (340, 380), 17: (340, 360), 19: (440, 320)}),
    "testbed_gfcg_atg": Layout([
        [Group("Models (testbed)", [1, 2, 3, 12], "models")],
        [Group("Class and latent", [4, 5], "conditioning")],
        [Group("GFCG + autoguidance", [6, 7], "guidance")],
        [Group("Sampling", [[8, 9, 10], [11]], "sampling")],
        [Group("Decode and save", [13, 14], "output")],
    ], "\n".join([
        STARTS,
        "- class_name (EDM2 Class Label) and desired_class (GFCG Guider): one of the 10 testbed shapes "
        "(6 = triangle up); keep the two the same.",
        "- tau 0.5: shapes the classifier is at least this sure of get no push; 0 turns GFCG off.",
        "- alpha 4; period 2 and settle_after 4: the benchmark's precision at 8 classifier calls, not 18.",
        "- GFCG Combiner: mode auto (= swap: autoguidance's cost); scale 2 is the autoguidance weight.",
    ]), {14: (340, 360)}),
    "sdxl_gfcg_cfg": Layout([
        [Group("Models (SDXL base, classifier)", [1, 2], "models")],
        [Group("Prompts (SDXL)", [3, 4], "conditioning"), Group("Latent", [5], "conditioning")],
        [Group("GFCG + CFG", [6, 7], "guidance")],
        [Group("Sampling", [[8, 9, 10], [11]], "sampling")],
        [Group("Decode and save", [12, 13], "output"), Group("What the classifier saw", [14, 15], "trace")],
    ], "\n".join([
        STARTS,
        "- desired_class (GFCG Guider): the ImageNet class you want, now red fox; put it in both prompt "
        "boxes (text_g, text_l) and keep prompt_template the same prompt with {} for the class.",
        "- tau 0.5: samples the classifier is at least this sure of get no push; 0 turns GFCG off.",
        "- alpha 8: the largest extra push, for samples the classifier doubts most; lower it if images break up.",
        "- GFCG Combiner: mode additive (one more branch) or swap (CFG's cost); scale 7 is the CFG scale.",
    ]), {13: (340, 360), 15: (440, 320), 3: (380, 420), 4: (380, 420)}),
    "testbed_gfcg_ksampler_patch": Layout([
        [Group("Models (testbed)", [1, 2, 3], "models")],
        [Group("GFCG Model Patch", [7], "guidance"), Group("Class labels and latent", [4, 5, 6], "conditioning")],
        [Group("KSampler", [8], "sampling")],
        [Group("Decode and save", [9, 10], "output"), Group("What the classifier saw", [11, 12], "trace")],
    ], "\n".join([
        STARTS,
        "- desired_class (GFCG Model Patch) and the positive EDM2 Class Label: the same testbed shape "
        "(6 = triangle up).",
        "- tau 0.5 (0 = GFCG off) and alpha 8 (the largest extra push).",
        "- mode (Model Patch): additive or swap, with the KSampler's cfg 2; at cfg 1 GFCG runs alone.",
        "- The KSampler's sampler and scheduler: heun and karras are EDM2's.",
    ]), {10: (340, 360), 12: (440, 320)}),
    "testbed_gfcg_vs_gradient": Layout([
        [Group("Models (testbed)", [1, 2, 3], "models")],
        [Group("Class and latent", [4, 5], "conditioning"),
         Group("The same noise, sampler and steps", [8, 9, 10], "sampling")],
        [Group("GFCG (gradient-free)", [6], "guidance"),
         Group("Classifier guidance (gradient)", [7], "guidance")],
        [Group("Sample: GFCG", [11], "sampling"),
         Group("Sample: gradient", [12], "sampling", align="Classifier guidance (gradient)")],
        [Group("Output: GFCG", [[13], [15]], "output"),
         Group("Output: gradient", [[14], [16]], "output", align="Sample: gradient")],
    ], "\n".join([
        STARTS,
        "- desired_class (in both guiders) and class_name (EDM2 Class Label): the same testbed shape "
        "(6 = triangle up).",
        "- GFCG Guider: tau 0.5 (0 = off) and alpha 8 (the largest extra push).",
        "- Classifier Guidance: scale 0.02 (the push per step; 0 = off), gamma 0.3.",
        "- Both samplers share one noise seed: the two Save Image nodes differ only by the guidance.",
    ]), {15: (340, 360), 16: (340, 360)}),
}


# ------------------------------------------------------------------------------------------------
# Node sizes


def measured_sizes(name: str) -> dict:
    """{node id: (w, h)}: the largest size any recorded frontend computed for the workflow's nodes."""
    if not SIZES_FILE.is_file():
        return {}
    data = json.loads(SIZES_FILE.read_text())
    out = {}
    for per_frontend in data.get("frontends", {}).values():
        for nid, (w, h) in per_frontend.get(name, {}).items():
            ow, oh = out.get(int(nid), (0, 0))
            out[int(nid)] = (max(ow, w), max(oh, h))
    return out


def _estimate(node) -> tuple:
    """A first guess where nothing was measured yet (a new workflow): the browser test measures."""
    slots = max(len(node.get("inputs", [])), len(node.get("outputs", [])))
    widgets = len(node.get("widgets_values", []))
    title = node.get("title", node["type"])
    return max(300, 8 * len(title) + 60), 12 + 22 * slots + 24 * widgets


def _ceil10(v):
    return int(math.ceil(v / 10.0) * 10)


def node_size(node, measured, minimum) -> list:
    w, h = measured.get(node["id"]) or _estimate(node)
    w, h = _ceil10(w + MARGIN[0]), _ceil10(h + MARGIN[1])
    mw, mh = minimum.get(node["id"], (0, 0))
    return [max(w, mw), max(h, mh)]


# ------------------------------------------------------------------------------------------------
# Placement


def _note_node(nid, text, x, y, width):
    wrap = max(20, int((width - 24) / 7.4))   # characters per line at the Note's font
    lines = sum(max(1, math.ceil(len(line) / wrap)) for line in text.splitlines())
    return {"id": nid, "type": "Note", "title": "Start here", "pos": [x, y + TITLE_HEIGHT],
            "size": [width, _ceil10(30 + 18 * lines)], "flags": {}, "mode": 0, "inputs": [], "outputs": [],
            "properties": {"text": ""}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"}


def _place_group(group, by_id, sizes, x, top):
    """Places the group's nodes with the group's top-left corner at (x, top); returns its bounding."""
    cols = group.members if isinstance(group.members[0], list) else [group.members]
    cx = x + GROUP_PAD
    inner_top = top + GROUP_TITLE + GROUP_PAD
    bottom = inner_top
    for col in cols:
        width = max(sizes[nid][0] for nid in col)   # one width per node column: tidy edges
        y = inner_top
        for nid in col:
            sizes[nid][0] = width
            by_id[nid]["pos"] = [cx, y + TITLE_HEIGHT]
            by_id[nid]["size"] = list(sizes[nid])
            y += TITLE_HEIGHT + sizes[nid][1] + NODE_GAP
        bottom = max(bottom, y - NODE_GAP)
        cx += width + INNER_GAP
    right = max(cx - INNER_GAP + GROUP_PAD, x + _ceil10(GROUP_FONT * 0.62 * len(group.title) + 2 * GROUP_PAD))
    return [x, top, right - x, bottom + GROUP_PAD - top]


def arrange(name: str, nodes: list, sizes: dict | None = None) -> dict:
    """Places the editor nodes of workflow ``name`` (sets pos and size in place); returns the groups
    and the Note, as api_to_ui's layout callable does."""
    layout = LAYOUTS[name]
    measured = measured_sizes(name) if sizes is None else sizes
    by_id = {n["id"]: n for n in nodes}
    placed = {nid for col in layout.columns for g in col
              for nid in (sum(g.members, []) if isinstance(g.members[0], list) else g.members)}
    if placed != set(by_id):
        raise ValueError(f"{name}: the layout places {sorted(placed)}, the workflow has {sorted(by_id)}")
    size = {nid: node_size(n, measured, layout.min_size) for nid, n in by_id.items()}
    note_id = max(by_id) + 1
    groups, tops, x = [], {}, 0
    note = None
    for k, column in enumerate(layout.columns):
        y, right = 0, x
        if k == 0:
            note = _note_node(note_id, layout.note, x, 0, NOTE_WIDTH)
            note["size"] = node_size(note, measured, {note_id: note["size"]})
            y = TITLE_HEIGHT + note["size"][1] + GROUP_GAP
            right = x + note["size"][0]
        for g in column:
            if g.align is not None:
                y = max(y, tops[g.align])
            box = _place_group(g, by_id, size, x, y)
            tops[g.title] = y
            groups.append({"id": len(groups) + 1, "title": g.title, "bounding": box, "color": COLORS[g.role],
                           "font_size": GROUP_FONT, "flags": {}})
            y = box[1] + box[3] + GROUP_GAP
            right = max(right, box[0] + box[2])
        x = right + COLUMN_GAP
    return {"groups": groups, "nodes": [note]}


def layout_for(name: str):
    """api_to_ui's layout argument for workflow ``name``."""
    return lambda nodes: arrange(name, nodes)
