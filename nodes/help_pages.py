"""Help pages for ComfyUI's node documentation panel (``web/docs/<node id>.md``), written from the
nodes' own schemas (description, inputs with their tooltips, defaults and ranges, outputs), so
the pages cannot drift from the nodes. ``tests/test_docs.py`` checks the committed pages."""
from __future__ import annotations

from typing import Dict

GUIDE = {  # a line on where each node sits in a graph
    "GFCGGuider": "model + conditioning + classifier -> **GUIDER** -> SamplerCustomAdvanced (or the GFCG Combiner).",
    "GFCGCombiner": "GFCG Guider -> **GUIDER** (stacked on CFG or autoguidance) -> SamplerCustomAdvanced.",
    "GFCGModelPatch": "model + classifier -> **MODEL** -> KSampler / KSamplerAdvanced.",
    "GFCGClassifierGuidance": "model + conditioning + classifier -> **GUIDER** -> SamplerCustomAdvanced.",
    "GFCGTracePlot": "the sampler's LATENT + the guider (or the patched model) -> **IMAGE** -> Preview / Save Image.",
}


FILE_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".pkl", ".bin", ".ckpt", ".txt")


def _value(v) -> str:
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _input_row(name: str, spec, optional: bool) -> str:
    typ, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    if isinstance(typ, list) or typ == "COMBO":
        choices = typ if isinstance(typ, list) else opts.get("options", [])
        if not choices or "(none)" in choices or any(str(c).lower().endswith(FILE_EXTENSIONS) for c in choices):
            kind, allowed = "file", "a file from the folder named in the tooltip"   # varies per install
        elif len(choices) <= 8:
            kind, allowed = "choice", ", ".join(f"`{c}`" for c in choices)
        else:
            kind, allowed = "choice", "a searchable list in the editor"
    else:
        kind = typ
        rng = [f"{k} {opts[k]}" for k in ("min", "max") if k in opts]
        allowed = ", ".join(rng)
    default = f"`{_value(opts['default'])}`" if "default" in opts and kind != "file" else ""
    tip = (opts.get("tooltip") or "").replace("|", "\\|").replace("\n", " ")
    return f"| `{name}`{' (optional)' if optional else ''} | {kind} | {default} | {allowed} | {tip} |"


def help_page(info: Dict) -> str:
    """Markdown for one node from its V1 node info (what /object_info serves)."""
    lines = [f"# {info['display_name']}", "", info["description"], ""]
    if info["name"] in GUIDE:
        lines += [f"Where it goes: {GUIDE[info['name']]}", ""]
    lines += ["## Inputs", "", "| input | type | default | allowed | what it does |", "| --- | --- | --- | --- | --- |"]
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for group in ("required", "optional"):
        for name in order.get(group, []):
            lines.append(_input_row(name, info["input"][group][name], group == "optional"))
    lines += ["", "## Outputs", "", "| output | type | what it is |", "| --- | --- | --- |"]
    for name, typ, tip in zip(info["output_name"], info["output"], info.get("output_tooltips") or [""] * 99):
        lines.append(f"| `{name}` | {typ} | {(tip or '').replace('|', chr(92) + '|')} |")
    lines += ["", f"Node id `{info['name']}`, category `{info['category']}`; part of comfyui-gfcg (see its README).",
              ""]
    return "\n".join(lines)
