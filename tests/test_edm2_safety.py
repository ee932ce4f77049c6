"""Malicious and broken checkpoint files: each is refused with a message naming the cause, and no
side effect happens (a sentinel file that every payload would create never appears)."""
import io
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

import edm2_helpers as H
from comfyui_gfcg.edm2 import CheckpointError, read_checkpoint
from comfyui_gfcg.edm2.__main__ import main as edm2_cli


class Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def valid_bytes(tmp_path, src_sentinel):
    cfg = H.small_cfg("img512")
    return H.nvlabs_pickle_bytes(cfg, H.random_state_dict(cfg), src_sentinel)


def nested_storage_exploit(sentinel):
    """A storage blob (legacy torch.save) whose pickle reduces to os.system."""
    buf = io.BytesIO()
    torch.save(Reduce(os.system, f"touch {sentinel}"), buf, _use_new_zipfile_serialization=False)
    return pickle.dumps(Reduce(torch.storage._load_from_bytes, buf.getvalue()), protocol=4)


def persistent_record(meta_over, sentinel):
    def make(EasyDict):
        rec = H._Persistent("Precond", {"_parameters": {}}, H.sentinel_source(sentinel))
        meta = dict(type="class", version=6, module_src=rec.src, class_name=rec.class_name, state=rec.state)
        meta.update(meta_over)
        import sys
        return EasyDict(ema=Reduce(sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, meta))
    return H.dumps_with_fakes(make)


def side_effect_source_not_a_network(sentinel):
    """Well-formed persistence records whose module_src writes the sentinel; 'ema' is no network."""
    def make(EasyDict):
        return EasyDict(ema=H._Persistent("Exploit", {"payload": 1}, H.sentinel_source(sentinel)))
    return H.dumps_with_fakes(make)


CASES = {
    # name: (builder(sentinel, tmp_path) -> bytes, words the message must contain)
    "os.system (GLOBAL opcode, protocol 0)": (
        lambda s, t: pickle.dumps(Reduce(os.system, f"touch {s}"), protocol=0), ["system", "allow-list"]),
    "builtins.eval": (
        lambda s, t: pickle.dumps(Reduce(eval, f"open({str(s)!r}, 'w')"), protocol=4), ["builtins.eval"]),
    "builtins.exec": (
        lambda s, t: pickle.dumps(Reduce(exec, f"open({str(s)!r}, 'w')"), protocol=4), ["builtins.exec"]),
    "subprocess.check_call": (
        lambda s, t: pickle.dumps(Reduce(subprocess.check_call, ["touch", str(s)]), protocol=4),
        ["subprocess.check_call"]),
    "builtins.getattr gadget": (
        lambda s, t: pickle.dumps(Reduce(getattr, Reduce(__import__, "os"), "system"), protocol=2), ["builtins.getattr"]),
    "unknown class inside a valid tree": (
        lambda s, t: pickle.dumps({"ema": Reduce(collections_counter(), "abc")}, protocol=4), ["collections.Counter"]),
    "torch.load inside": (
        lambda s, t: pickle.dumps(Reduce(torch.load, str(s)), protocol=4), ["torch.serialization.load"]),
    "side-effecting module_src, no network": (
        lambda s, t: side_effect_source_not_a_network(s), ["'ema'", "Exploit"]),
    "persistent record of unknown version": (
        lambda s, t: persistent_record({"version": 5}, s), ["version 5"]),
    "persistent record of type function": (
        lambda s, t: persistent_record({"type": "function"}, s), ["'function'"]),
    "nested storage blob reducing to os.system": (
        lambda s, t: nested_storage_exploit(s), ["storage", "safely"]),
    "numpy object array": (
        lambda s, t: pickle.dumps({"ema": np.array([1, "x"], dtype=object)}, protocol=4), ["object dtype"]),
    "truncated NVlabs pickle": (
        lambda s, t: valid_bytes(t, s)[:200_000], ["truncated"]),
    "not a pickle (text)": (
        lambda s, t: b"hello, this is not a checkpoint\n", ["not a complete pickle stream"]),
    "empty file": (lambda s, t: b"", ["not a complete pickle stream"]),
    "torch.save zip archive": (
        lambda s, t: _torch_zip(), ["not a complete pickle stream"]),
    "random bytes": (lambda s, t: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), ["pickle"]),
}


def collections_counter():
    import collections
    return collections.Counter


def _torch_zip():
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("case", list(CASES))
def test_malicious_or_broken_file_is_refused_without_side_effect(case, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    build, words = CASES[case]
    path = tmp_path / "edm2-evil.pkl"
    path.write_bytes(build(sentinel, tmp_path))
    with pytest.raises(CheckpointError) as ei:
        read_checkpoint(str(path))
    msg = str(ei.value)
    assert "edm2-evil.pkl" in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    # the converter refuses too, writes nothing
    out = tmp_path / "out.safetensors"
    assert edm2_cli(["convert", str(path), str(out)]) == 2
    assert not out.exists()
    assert not sentinel.exists(), "a payload ran"


def test_corpus_is_large_enough():
    assert len(CASES) >= 6


def test_valid_file_with_side_effecting_source_loads_without_running_it(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "ok.pkl"
    path.write_bytes(valid_bytes(tmp_path, sentinel))
    ckpt = read_checkpoint(str(path))
    assert len(ckpt.state_dict) > 100
    assert not sentinel.exists()
    # a normal unpickle with the (fake) NVlabs hook *would* run foreign code: the file really carries it
    assert b"module_src must never be executed" in path.read_bytes()


def test_unsupported_extension_and_bad_safetensors(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="extension '.ckpt' not supported"):
        read_checkpoint(str(p))
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_checkpoint(str(p))
