"""Editor (LiteGraph) <-> API workflow conversion, driven by a ComfyUI server's /object_info.

The API form is the source we write by hand; the editor form is generated from it (and checked by
converting it back), so that both files always describe the same graph.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _inputs(info):
    """[(name, type, options, is_widget)] in the node's input order (required, then optional)."""
    out = []
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for group in ("required", "optional"):
        for name in order.get(group, []):
            spec = info["input"][group][name]
            typ, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            widget = isinstance(typ, list) or typ in WIDGET_TYPES
            out.append((name, "COMBO" if isinstance(typ, list) else typ, opts, widget))
    return out


def _depths(api):
    memo = {}

    def depth(nid):
        if nid not in memo:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            memo[nid] = 1 + max((depth(u) for u in ups), default=-1)
        return memo[nid]

    return {nid: depth(nid) for nid in api}


def _depth_layout(nodes, api):
    """The fallback layout: one column per depth in the graph, rows in id order, 300 x 200 boxes."""
    depth, rows = _depths(api), {}
    for node in nodes:
        d = depth[str(node["id"])]
        row = rows.setdefault(d, 0)
        rows[d] += 1
        node["pos"], node["size"] = [40 + 340 * d, 40 + 260 * row], [300, 200]
    return {}


def api_to_ui(api: dict, object_info: dict, layout=None) -> dict:
    """The editor form of an API workflow. ``layout(nodes)`` places the nodes (sets each one's pos and
    size) and returns {"groups": [...], "nodes": [frontend-only nodes such as a Note]}; without it,
    the nodes stand in depth columns."""
    nodes, links = [], []
    depth = _depths(api)
    link_id = 0
    outputs = {}   # (node, slot) -> output dict, filled below
    order = sorted(api, key=lambda n: (depth[n], int(n)))
    for k, nid in enumerate(order):
        spec, info = api[nid], object_info[api[nid]["class_type"]]
        node = {"id": int(nid), "type": spec["class_type"], "pos": [0, 0], "size": [300, 200], "flags": {},
                "order": k, "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": spec["class_type"]}, "widgets_values": []}
        if "_meta" in spec and "title" in spec["_meta"]:
            node["title"] = spec["_meta"]["title"]
        for slot, (typ, name) in enumerate(zip(info["output"], info.get("output_name", info["output"]))):
            out = {"name": name, "type": typ, "links": [], "slot_index": slot}
            node["outputs"].append(out)
            outputs[(nid, slot)] = out
        for name, typ, opts, widget in _inputs(info):
            value = spec["inputs"].get(name)
            if widget:
                if name not in spec["inputs"]:  # the editor stores every widget: so must the API file
                    raise ValueError(f"node {nid} ({spec['class_type']}): widget input {name!r} is missing")
                linked = isinstance(value, list)
                # the editor keeps a value for every widget, also one fed by a link (the widget's own socket)
                node["widgets_values"].append(opts.get("default", "") if linked else value)
                if opts.get("control_after_generate"):
                    node["widgets_values"].append("fixed")
                if opts.get("image_upload"):
                    node["widgets_values"].append("image")   # the upload button's value, as the editor saves it
                if linked:
                    node["inputs"].append({"name": name, "type": typ, "widget": {"name": name}, "link": None})
                continue
            node["inputs"].append({"name": name, "type": typ, "link": None})
        nodes.append(node)
    by_id = {str(n["id"]): n for n in nodes}
    for nid in order:
        for name, value in api[nid]["inputs"].items():
            if not isinstance(value, list):
                continue
            link_id += 1
            dst = by_id[nid]
            slot = next(i for i, inp in enumerate(dst["inputs"]) if inp["name"] == name)
            dst["inputs"][slot]["link"] = link_id
            src_out = outputs[(value[0], value[1])]
            src_out["links"].append(link_id)
            links.append([link_id, int(value[0]), value[1], int(nid), slot, src_out["type"]])
    placed = (layout or (lambda ns: _depth_layout(ns, api)))(nodes)
    extra = list(placed.get("nodes", []))
    for k, node in enumerate(extra):
        node.setdefault("order", len(nodes) + k)
    return {"last_node_id": max([int(n) for n in api] + [n["id"] for n in extra]), "last_link_id": link_id,
            "nodes": nodes + extra, "links": links, "groups": list(placed.get("groups", [])), "config": {},
            "extra": {}, "version": 0.4}


# Node types the editor has and the server does not (frontend-only: not in the API form)
FRONTEND_ONLY = {"Note", "MarkdownNote"}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    link = {lk[0]: lk for lk in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = object_info[node["type"]]
        inputs, values = {}, list(node.get("widgets_values", []))
        linked = {inp["name"]: inp["link"] for inp in node.get("inputs", []) if inp.get("link") is not None}
        for name, typ, opts, widget in _inputs(info):
            has_value = widget and bool(values)
            if has_value:   # every widget has its value, linked or not
                value = values.pop(0)
                if opts.get("control_after_generate") and values:
                    values.pop(0)
                if opts.get("image_upload") and values and values[0] == "image":
                    values.pop(0)
            if name in linked:
                lk = link[linked[name]]
                inputs[name] = [str(lk[1]), lk[2]]
            elif has_value:
                inputs[name] = value
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def link_problems(ui: dict, object_info: dict) -> list:
    """Links of an editor workflow whose recorded type is not what the source node puts out at that
    slot and the target input takes (``*`` matches anything)."""
    problems, nodes = [], {n["id"]: n for n in ui["nodes"]}
    for lk_id, src, slot, dst, dst_slot, typ in ui["links"]:
        out = object_info[nodes[src]["type"]]["output"]
        got = out[slot] if slot < len(out) else None
        inp = nodes[dst]["inputs"][dst_slot]
        specs = {n: t for n, t, _, _ in _inputs(object_info[nodes[dst]["type"]])}
        want = specs.get(inp["name"])
        for name, t in (("source output", got), ("target input", want)):
            if t != typ and "*" not in (t, typ):
                problems.append(f"link {lk_id}: recorded {typ}, {name} is {t}")
    return problems


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


# ------------------------------------------------------------------------------------------------
# A committed snapshot of the node schemas the workflows use, for checks without ComfyUI

FILE_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".pkl", ".bin", ".ckpt", ".txt",
                   ".png", ".jpg", ".jpeg", ".webp")   # model files, class lists, input images (LoadImage)

# combos whose options depend on what is installed, not on the ComfyUI version: kept without options
# (``"installed": true``), any non-empty name passes
INSTALL_DEPENDENT = {("GFCGLoadZeroShotClassifier", "architecture")}   # open_clip.list_models()


def _is_file_combo(options) -> bool:
    """A combo listing model files (empty where the folder is empty)."""
    return not options or any(str(o).lower().endswith(FILE_EXTENSIONS) or o in ("(none)", "pixel_space") for o in options)


def schema_snapshot(api_workflows, object_info: dict) -> dict:
    """The /object_info entries of every node type the workflows use, minus what depends on the
    install: combos that list files keep no options (marked ``"files": true``)."""
    types = sorted({n["class_type"] for wf in api_workflows for n in wf.values()})
    snap = {}
    for t in types:
        info = object_info[t]
        entry = {"input": {}, "input_order": info.get("input_order"), "output": info["output"]}
        for group, specs in info["input"].items():
            entry["input"][group] = {}
            for name, spec in specs.items():
                typ, opts = spec[0], dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
                keep = {k: opts[k] for k in ("default", "min", "max", "control_after_generate", "multiline",
                                             "image_upload") if k in opts}
                if isinstance(typ, list) or typ == "COMBO":
                    options = typ if isinstance(typ, list) else opts.get("options", [])
                    if (t, name) in INSTALL_DEPENDENT:
                        keep = {"installed": True}
                        options = []
                    elif _is_file_combo(options):
                        keep["files"] = True
                        options = []
                    entry["input"][group][name] = ["COMBO", dict(keep, options=list(options))]
                else:
                    entry["input"][group][name] = [typ, keep]
        snap[t] = entry
    return snap


def check_against_schemas(api: dict, snap: dict) -> list:
    """Problems of an API workflow against a schema snapshot: unknown node types or inputs,
    missing required inputs, links between mismatched types, widget values out of range or not
    among a combo's options (file combos: any file name with a model extension)."""
    problems = []
    for nid, node in api.items():
        t = node["class_type"]
        if t not in snap:
            problems.append(f"{nid}: unknown node type {t!r}")
            continue
        specs = {**snap[t]["input"].get("required", {}), **snap[t]["input"].get("optional", {})}
        for name in snap[t]["input"].get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"{nid} {t}: required input {name!r} missing")
        for name, value in node["inputs"].items():
            if name not in specs:
                problems.append(f"{nid} {t}: unknown input {name!r}")
                continue
            typ, opts = specs[name]
            if isinstance(value, list):
                src = api.get(value[0])
                if src is None:
                    problems.append(f"{nid} {t}.{name}: link to missing node {value[0]}")
                    continue
                out = snap[src["class_type"]]["output"]
                got = out[value[1]] if value[1] < len(out) else None
                if got != typ and "*" not in (got, typ):
                    problems.append(f"{nid} {t}.{name}: a {got} link into a {typ} input")
            elif typ == "COMBO":
                if opts.get("installed"):
                    if not (isinstance(value, str) and value.strip()):
                        problems.append(f"{nid} {t}.{name}: {value!r} is not a name")
                elif opts.get("files"):
                    if not (str(value).lower().endswith(FILE_EXTENSIONS) or value in ("pixel_space", "(none)")):
                        problems.append(f"{nid} {t}.{name}: {value!r} is not a model file name")
                elif value not in opts["options"]:
                    problems.append(f"{nid} {t}.{name}: {value!r} not among {opts['options'][:6]}")
            elif typ in ("INT", "FLOAT"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    (typ == "FLOAT" or float(value).is_integer())
                if not ok or value < opts.get("min", -float("inf")) or value > opts.get("max", float("inf")):
                    problems.append(f"{nid} {t}.{name}: {value!r} is not a {typ} in [{opts.get('min')}, {opts.get('max')}]")
            elif typ == "STRING" and not isinstance(value, str):
                problems.append(f"{nid} {t}.{name}: {value!r} is not a string")
            elif typ == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"{nid} {t}.{name}: {value!r} is not a boolean")
    return problems
