"""The guider's evaluations of a ComfyUI model (imports ComfyUI): every branch one model needs in
one evaluation through ONE forward where the conds are plain (one entry each, no area / mask /
ControlNet / hooks, no model wrappers), the rows of each branch concatenated as ComfyUI's own
``calc_cond_batch`` does for equal-sized branches; otherwise ComfyUI's ``calc_cond_batch`` (one
call per distinct row set, or on the whole batch where a row subset cannot be sliced: see
:func:`_sliceable`). Also the multi-GPU handling of a guide model's evaluations."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers

from .callconv import call_with_supported, supported_kwargs

log = logging.getLogger("comfyui_gfcg")


def _index_on(rows: torch.Tensor, device, host_rows: Optional[List[int]] = None) -> torch.Tensor:
    """``rows`` as an index on ``device``: for a tensor on the host (e.g. a cond ComfyUI keeps on the
    CPU until the forward) made from ``host_rows`` where the caller knows them, since copying device
    rows to the host would make the host wait for the device."""
    if rows.device == torch.device(device):
        return rows
    if host_rows is not None and torch.device(device).type == "cpu":
        return torch.tensor(host_rows, dtype=torch.long)
    return rows.to(device)


def _rows_of_cond(c, rows: Optional[torch.Tensor], batch: int, host_rows: Optional[List[int]] = None):
    """A processed model cond (comfy.conds.CONDxxx) for ``rows`` of a ``batch``-sized evaluation:
    per-sample tensors are indexed, not truncated (``repeat_to_batch_size`` would take the first rows)."""
    p = c.process_cond(batch_size=batch, area=None)
    if rows is None:
        return p
    v = p.cond
    if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == batch:
        return p._copy_with(v[_index_on(rows, v.device, host_rows)])
    if isinstance(v, list) and all(torch.is_tensor(t) and t.shape[0] == batch for t in v):
        return p._copy_with([t[_index_on(rows, t.device, host_rows)] for t in v])
    return p


_PLAIN_BLOCKERS = ("area", "mask", "control", "gligen", "hooks", "default")


def _plain(cond_list) -> bool:
    return cond_list is not None and len(cond_list) == 1 and not any(k in cond_list[0] for k in _PLAIN_BLOCKERS)


def _in_time_range(cond: dict, t: torch.Tensor) -> bool:
    if "timestep_start" in cond and t[0] > cond["timestep_start"]:
        return False
    if "timestep_end" in cond and t[0] < cond["timestep_end"]:
        return False
    return True


# model_options keys under which ComfyUI runs its own batching (wrappers, context windows, the
# multi-GPU split of newer ComfyUI): the fused forward steps aside and calc_cond_batch runs.
_OWN_PATH_KEYS = ("model_function_wrapper", "context_handler", "multigpu_clones")


def _fusable(model, entries, t, model_options) -> bool:
    if any(model_options.get(k) is not None for k in _OWN_PATH_KEYS):
        return False
    topts = model_options.get("transformer_options", {})
    if topts.get("patches") or topts.get("patches_replace"):
        return False  # attention patches split the batch into equal chunks
    if comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, model_options,
                                                 is_model_options=True):
        return False
    if not all(_plain(c) and _in_time_range(c[0], t) for c, _, _ in entries):
        return False
    first = {k: v.process_cond(batch_size=1, area=None) for k, v in entries[0][0][0]["model_conds"].items()}
    for c, _, _ in entries[1:]:
        other = {k: v.process_cond(batch_size=1, area=None) for k, v in c[0]["model_conds"].items()}
        if first.keys() != other.keys() or not all(first[k].can_concat(other[k]) for k in first):
            return False
    return True


def batched_forward(model, entries: Sequence[Tuple[list, Optional[torch.Tensor], int]], x: torch.Tensor,
                    t: torch.Tensor, model_options: dict,
                    host_rows: Optional[Sequence[Optional[List[int]]]] = None) -> List[torch.Tensor]:
    """Denoised predictions for ``entries`` = [(cond_list, rows or None, cond_or_uncond)], each on
    ``x[rows]`` (``host_rows``: the entries' rows as lists where the caller knows them, which saves
    copying device rows to the host for conds that live there). One model forward when the conds allow it, else ComfyUI's ``calc_cond_batch``: the
    whole-batch entries, and the row subsets that cannot be sliced (:func:`_sliceable`, whose rows are
    then kept from a whole-batch result), in calls shaped as CFGGuider's (at most one cond at index 0
    and one uncond at index 1, so a negative is marked uncond); then one call per sliceable subset."""
    b = x.shape[0]
    host = list(host_rows) if host_rows is not None else [None] * len(entries)
    sizes = [b if rows is None else int(rows.numel()) for _, rows, _ in entries]
    if len(entries) > 1 and _fusable(model, entries, t, model_options):
        shape = [sum(sizes)] + list(x.shape[1:])
        if _memory_required(model, shape, entries) * 1.5 < _free_memory(model, x.device):
            return _fused(model, entries, sizes, x, t, model_options, host)
    outs: List[Optional[torch.Tensor]] = [None] * len(entries)
    full = [i for i, (c, rows, _) in enumerate(entries) if rows is None or not _sliceable(c, model_options)]
    while full:
        slot: Dict[int, int] = {}   # cond_or_uncond -> entry
        for i in full:
            slot.setdefault(entries[i][2], i)
        full = [i for i in full if i not in slot.values()]
        res = comfy.samplers.calc_cond_batch(
            model, [entries[slot[w]][0] if w in slot else None for w in range(max(slot) + 1)], x, t, model_options)
        for w, i in slot.items():
            rows = entries[i][1]
            outs[i] = res[w] if rows is None else res[w][_index_on(rows, res[w].device, host[i])]
    for i, (cond_list, rows, which) in enumerate(entries):
        if outs[i] is None:
            sub = [_slice_cond_entry(c, rows, b, host[i]) for c in cond_list]
            outs[i] = comfy.samplers.calc_cond_batch(model, [None] * which + [sub], x[rows], t[rows],
                                                     model_options)[which]
    return outs


def _sliceable(cond_list, model_options) -> bool:
    """Whether a row subset of ``cond_list`` can be evaluated on ``x[rows]`` alone. Not where
    per-sample inputs live outside the conds, which ComfyUI fits to a smaller batch by its FIRST rows:
    a ControlNet / T2I-Adapter (``control``) with one hint image per sample (``broadcast_image_to``;
    ControlNet and T2I-Adapter up to ComfyUI 0.33 also cache that cut-down hint, and every later
    whole-batch forward then gets the wrong images' hints), and model patches (an IP-Adapter's
    attention patch fits per-image embeddings to the batch by ``tensor_to_size``). Those subsets run on
    the whole batch and keep their rows. Measured cost (the setup of tests/test_comfy_controlnet.py:
    batch 4, rows 1 and 3 confused, one reference class, the classifier at every evaluation): the
    model's rows per evaluation go from 6 to 8 for GFCG alone, 10 to 12 with CFG (additive) and 8 to 12
    in swap mode (the confident rows' negative becomes the whole negative); in general one whole batch
    per distinct reference class instead of the confused rows. A ComfyUI control whose hints are one
    image (the usual single control image) fits any rows and slices as before, at no extra cost."""
    topts = model_options.get("transformer_options", {})
    if topts.get("patches") or topts.get("patches_replace"):
        return False
    return all(_one_hint(c.get("control")) for c in cond_list)


def _one_hint(control) -> bool:
    """True for no control, or a chain of ComfyUI's own controls (``comfy.controlnet``) each with one
    hint image (and one image per extra concat): broadcast to any batch, they fit every row subset."""
    while control is not None:
        if type(control).__module__ != "comfy.controlnet":
            return False   # another pack's control may hold more per-sample state (masks, keyframes)
        hints = [getattr(control, "cond_hint_original", None)] + list(getattr(control, "extra_concat_orig", []))
        if not all(torch.is_tensor(h) and h.shape[0] == 1 for h in hints):
            return False
        control = getattr(control, "previous_controlnet", None)
    return True


def _free_memory(model, device) -> int:
    """Free memory for the model's forward as ComfyUI's own batching sees it: the patcher's view
    where the patcher has one (newer ComfyUI, which accounts for dynamically loaded weights), else
    model management's."""
    patcher = getattr(model, "current_patcher", None)
    if patcher is not None and hasattr(patcher, "get_free_memory"):
        return patcher.get_free_memory(device)
    return comfy.model_management.get_free_memory(device)


def _memory_required(model, shape, entries) -> float:
    """``model.memory_required`` for the fused batch, with the conds' shapes where it takes them."""
    kw = {}
    if "cond_shapes" in supported_kwargs(model.memory_required, {"cond_shapes": None}):
        shapes: Dict[str, list] = {}
        for cond_list, rows, _ in entries:
            for k, v in cond_list[0]["model_conds"].items():
                size = getattr(v, "size", None)
                if callable(size):
                    try:
                        shapes.setdefault(k, []).append(size())
                    except Exception:  # a cond type without a meaningful size
                        pass
        kw["cond_shapes"] = shapes
    return model.memory_required(shape, **kw)


def _slice_cond_entry(c: dict, rows: torch.Tensor, batch: int, host_rows: Optional[List[int]] = None) -> dict:
    out = dict(c)
    out["model_conds"] = {k: _rows_of_cond(v, rows, batch, host_rows) for k, v in c["model_conds"].items()}
    m = c.get("mask")
    if torch.is_tensor(m) and m.shape[0] == batch and batch > 1:
        out["mask"] = m[_index_on(rows, m.device, host_rows)]
    return out


def _fused(model, entries, sizes, x, t, model_options, host) -> List[torch.Tensor]:
    b = x.shape[0]
    inputs, conds, ts, cou, uuids = [], [], [], [], []
    for (cond_list, rows, which), n, hr in zip(entries, sizes, host):
        c = cond_list[0]
        inputs.append(x if rows is None else x[rows])
        ts.append(t if rows is None else t[rows])
        conds.append({k: _rows_of_cond(v, rows, b, hr) for k, v in c["model_conds"].items()})
        cou.append(which)
        uuids.append(c.get("uuid"))
    call_with_supported(model.current_patcher.prepare_state, t, model_options=model_options)
    topts = model.current_patcher.apply_hooks(hooks=None)
    if "transformer_options" in model_options:
        topts = comfy.patcher_extension.merge_nested_dicts(topts, model_options["transformer_options"], copy_dict1=False)
    topts["cond_or_uncond"] = cou
    topts["uuids"] = uuids
    topts["sigmas"] = t
    c = comfy.samplers.cond_cat(conds)
    c["transformer_options"] = topts
    out = model.apply_model(torch.cat(inputs), torch.cat(ts), **c)
    return list(out.split(sizes))


def single_device(patcher):
    """``patcher`` without per-GPU clones of its own (ComfyUI's MultiGPU CFG Split, v0.33+): a guide
    model runs on the main device. Its clones would otherwise join the main model's split."""
    if not getattr(patcher, "get_additional_models_with_key", None) or not patcher.get_additional_models_with_key("multigpu"):
        return patcher
    log.warning("guide_model: its MultiGPU CFG Split is not used; the guide runs on %s", patcher.load_device)
    p = patcher.clone()
    p.remove_additional_models("multigpu")
    return p


# model_options keys of ComfyUI's multi-GPU split (v0.33+): they describe the MAIN model's clones
_MULTIGPU_KEYS = ("multigpu_clones", "multigpu_thread_pool")


def guide_options(model_options: dict) -> dict:
    """The model options for the guide model's evaluations: the main model's multi-GPU clones
    removed (ComfyUI would otherwise run the main network's clones on the guide's branches)."""
    if not any(k in model_options for k in _MULTIGPU_KEYS):
        return model_options
    return {k: v for k, v in model_options.items() if k not in _MULTIGPU_KEYS}
