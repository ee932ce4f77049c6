"""The host reads a CUDA run would make, counted on any device (the CPU included).

On a GPU, an operation whose result the host needs -- a tensor's value as a Python number, its rows
as a list, an output whose size depends on the data (``nonzero``, ``unique``, boolean-mask
indexing) -- makes the host wait until the device has finished everything queued before it.
``torch.cuda.set_sync_debug_mode`` warns on those, but only on a CUDA device. :class:`HostReads`
sees the same operations through torch's dispatcher wherever they run, so CI (which has no GPU)
can count and hold the step loop's reads.

What it counts (each one synchronisation on CUDA):

- ``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``;
- data-dependent output sizes: ``nonzero``, ``unique`` (all forms), ``masked_select``,
  ``repeat_interleave`` without ``output_size``, indexing with a boolean mask;
- ``aten.equal`` (its answer is a Python bool);
- ``Tensor.tolist()`` and ``Tensor.numpy()`` (a copy to the host), which do not go through the
  dispatcher and are wrapped while counting.

Counted apart, as ``uploads``: tensors made from Python data (``torch.tensor``, ``torch.as_tensor``
of numbers). Placed on a CUDA device, each is a synchronous host-to-device copy (which
``set_sync_debug_mode`` also reports); left on the host, nothing.

It cannot tell a tensor that would live on the host in a GPU run (a CPU tensor built from Python
numbers) from one that would live on the device, so reads of host-side tensors count too; the
callers that matter read device tensors. Each read is charged to the innermost Python line
outside torch's dispatch machinery and this module (the line ``set_sync_debug_mode`` would name).
"""
from __future__ import annotations

import collections
import os
import sys
from typing import Counter, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = os.path.abspath(__file__)
# torch's own frames between an operation and this mode (not the caller set_sync_debug_mode names)
_MACHINERY = (os.path.join("torch", "utils", "_python_dispatch.py"), os.path.join("torch", "_dynamo", ""),
              os.path.join("torch", "_compile.py"))

# (in inference mode the composite item / is_nonzero reach the mode undecomposed)
_SCALAR_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default}
_SIZE_OPS = {aten.nonzero.default, aten.masked_select.default, aten._unique.default, aten._unique2.default,
             aten.unique_consecutive.default, aten.unique_dim.default, aten.unique_dim_consecutive.default,
             aten.argwhere.default}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def is_pack_file(path: str) -> bool:
    """A source file of the pack itself (not its tests, nor a virtual environment inside the checkout)."""
    if not path.startswith(PACK_ROOT + os.sep):
        return False
    rest = path[len(PACK_ROOT):]
    return "site-packages" not in rest and os.sep + "tests" + os.sep not in rest


def owner(filename: str) -> str:
    """'pack' | 'comfyui' | 'torch' | 'other' for a source file."""
    path = os.path.abspath(filename)
    if is_pack_file(path):
        return "pack"
    if f"{os.sep}torch{os.sep}" in path:
        return "torch"
    if f"{os.sep}comfy" in path:
        return "comfyui"
    return "other"


def by_owner(lines) -> dict:
    """Counts per ``(file, line)`` summed by the lines' owner (:func:`owner`)."""
    out: Counter[str] = collections.Counter()
    for (f, _), n in lines.items():
        out[owner(f)] += n
    return dict(out)


def top_lines(lines, n: int = 10) -> dict:
    """The ``n`` lines counted most, as ``file:line`` (the pack's files relative to the pack)."""
    def name(f):
        return os.path.relpath(f, PACK_ROOT) if is_pack_file(f) else os.path.basename(f)
    return {f"{name(f)}:{ln}": c for (f, ln), c in lines.most_common(n)}


def _is_read(func, args, kwargs) -> bool:
    if func in _SCALAR_OPS or func in _SIZE_OPS:
        return True
    if func is aten.repeat_interleave.Tensor or func is aten.repeat_interleave.self_Tensor:
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    if func in _INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)
    return False


class HostReads(TorchDispatchMode):
    """Counts host reads (see the module) while active; ``lines`` maps ``(file, line)`` of the
    innermost caller to a count, ``uploads`` the same for uploads."""

    def __init__(self):
        super().__init__()
        self.lines: Counter[Tuple[str, int]] = collections.Counter()
        self.uploads: Counter[Tuple[str, int]] = collections.Counter()   # innermost line of each upload
        self._wrapped = []

    @property
    def total(self) -> int:
        return sum(self.lines.values())

    def by_owner(self) -> dict:
        return by_owner(self.lines)

    def _charge(self, upload: bool = False) -> None:
        frame = sys._getframe(2)
        while frame is not None and (os.path.abspath(frame.f_code.co_filename) == _HERE
                                     or any(m in frame.f_code.co_filename for m in _MACHINERY)):
            frame = frame.f_back
        where = (os.path.abspath(frame.f_code.co_filename), frame.f_lineno) if frame is not None else ("?", 0)
        (self.uploads if upload else self.lines)[where] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_read(func, args, kwargs):
            self._charge()
        elif func is aten.lift_fresh.default:
            self._charge(upload=True)
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("tolist", "numpy"):
            real = getattr(torch.Tensor, name)

            def wrapped(t, *a, _real=real, **k):
                self._charge()
                return _real(t, *a, **k)

            setattr(torch.Tensor, name, wrapped)
            self._wrapped.append((name, real))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, real in reversed(self._wrapped):
                setattr(torch.Tensor, name, real)
            self._wrapped = []

    def top(self, n: int = 10, uploads: bool = False) -> dict:
        """The ``n`` lines that read (or upload) most (:func:`top_lines`)."""
        return top_lines(self.uploads if uploads else self.lines, n)
