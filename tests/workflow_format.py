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


def api_to_ui(api: dict, object_info: dict) -> dict:
    nodes, links = [], []
    depth = _depths(api)
    rows = {}
    link_id = 0
    outputs = {}   # (node, slot) -> output dict, filled below
    order = sorted(api, key=lambda n: (depth[n], int(n)))
    for k, nid in enumerate(order):
        spec, info = api[nid], object_info[api[nid]["class_type"]]
        row = rows.setdefault(depth[nid], 0)
        rows[depth[nid]] += 1
        node = {"id": int(nid), "type": spec["class_type"], "pos": [40 + 340 * depth[nid], 40 + 260 * row],
                "size": [300, 200], "flags": {}, "order": k, "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": spec["class_type"]}, "widgets_values": []}
        if "_meta" in spec and "title" in spec["_meta"]:
            node["title"] = spec["_meta"]["title"]
        for slot, (typ, name) in enumerate(zip(info["output"], info.get("output_name", info["output"]))):
            out = {"name": name, "type": typ, "links": [], "slot_index": slot}
            node["outputs"].append(out)
            outputs[(nid, slot)] = out
        for name, typ, opts, widget in _inputs(info):
            value = spec["inputs"].get(name)
            if widget and not isinstance(value, list):
                if name not in spec["inputs"]:  # the editor stores every widget: so must the API file
                    raise ValueError(f"node {nid} ({spec['class_type']}): widget input {name!r} is missing")
                node["widgets_values"].append(value)
                if opts.get("control_after_generate"):
                    node["widgets_values"].append("fixed")
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
    return {"last_node_id": max(int(n) for n in api), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    link = {lk[0]: lk for lk in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        inputs, values = {}, list(node.get("widgets_values", []))
        linked = {inp["name"]: inp["link"] for inp in node.get("inputs", []) if inp.get("link") is not None}
        for name, typ, opts, widget in _inputs(info):
            if name in linked:
                lk = link[linked[name]]
                inputs[name] = [str(lk[1]), lk[2]]
            elif widget and values:
                inputs[name] = values.pop(0)
                if opts.get("control_after_generate"):
                    values.pop(0)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
