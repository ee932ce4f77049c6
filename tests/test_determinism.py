"""Determinism (issue 7): the same seed gives bit-identical output on the CPU, different seeds differ.

Core tests (no ComfyUI): the headless testbed sampler on the committed testbed models, in both
trunk dtypes the testbed uses. Every guidance method is run twice with one seed and compared with
``torch.equal``, and once with another seed, which must change the output. The stochastic reference
draws from a generator seeded with the noise seed, so its traces (the reference classes chosen per
step and row) must repeat too. Batches of 1 and 16 rows with per-row desired classes. Finally a
fresh Python process must reproduce the in-process results (sha256 of the tensor bytes), so that
determinism does not depend on the state of this process (caches, generators, earlier runs).

"Same seed" means the same configuration, torch's intra-op thread count included: float32 results
of small batches differ in the last bits between 1 and 2 threads (see ``fresh``); bfloat16 and the
16-row batches do not here. So does torch's reduced-precision SDPA flag, which ComfyUI's import
sets (bf16 results change with it). Gradient guidance of one image is not bit-reproducible on 2
threads even within one process (CPU gradient kernels: runs of the same seed differ by up to about
6e-6, measured; none on 1 thread), so the one-image CG cases run on 1 thread.
"""
import dataclasses
import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_gfcg.guiders.config import GFCGConfig
from comfyui_gfcg.guiders.engine import GFCGEngine
from comfyui_gfcg.guiders.gradient import CGConfig
from comfyui_gfcg.testbed.bench import CG_SCALE, Settings, guidance_classifier_for
from comfyui_gfcg.testbed.dataset import NUM_CLASSES, RESOLUTION
from comfyui_gfcg.testbed.models import load_testbed
from comfyui_gfcg.testbed.sampler import CG_METHODS, sample

STEPS = 6                      # Heun: 11 evaluations per image
SEED, OTHER_SEED = 1234, 98765
DTYPES = ("float32", "bfloat16")
ONE_CLASS = 3                  # diamond: often confused with square, so GFCG engages at n = 1

# case id -> (sampler method, mode, reference mode); "mode" matters only where GFCG is stacked on
# CFG / autoguidance, the reference mode only where GFCG runs
CASES = {
    "none": ("none", "additive", "deterministic"),
    "cfg": ("cfg", "additive", "deterministic"),
    "atg": ("atg", "additive", "deterministic"),
    "gfcg": ("gfcg", "additive", "deterministic"),
    "gfcg-stochastic": ("gfcg", "additive", "stochastic"),
    "gfcg+cfg-additive": ("gfcg+cfg", "additive", "deterministic"),
    "gfcg+cfg-swap": ("gfcg+cfg", "swap", "deterministic"),
    "gfcg+cfg-swap-stochastic": ("gfcg+cfg", "swap", "stochastic"),
    "gfcg+atg-additive": ("gfcg+atg", "additive", "deterministic"),
    "gfcg+atg-swap": ("gfcg+atg", "swap", "deterministic"),
    "cg": ("cg", "additive", "deterministic"),
}
# the 16-row batches (each run costs about 8 one-row runs): the stacked GFCG paths that evaluate
# branches on row subsets (swap: the negative / the guide on the confident rows only), gradient
# guidance, and the stochastic reference (its own test below)
BATCH_CASES = ["gfcg+cfg-swap", "gfcg+atg-swap", "cg"]
N_BATCH = 16


@functools.lru_cache(maxsize=None)
def models(dtype: str):
    return load_testbed(dtype)


def per_row_classes(n: int) -> torch.Tensor:
    """n desired classes, one per row (3, 4, ..., 9, 0, 1, ...): every class in a batch of 16."""
    return (torch.arange(n) + ONE_CLASS) % NUM_CLASSES


def run(dtype: str, case: str, seed: int, n: int = 1):
    """One headless sampling run of ``case`` (the bench's settings, but STEPS steps): ``n`` rows
    with per-row desired classes (a tensor, also for n = 1); one-image gradient guidance on 1 thread
    (see the module's docstring)."""
    if CASES[case][0] in CG_METHODS and n == 1 and torch.get_num_threads() != 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run(dtype, case, seed, n)
        finally:
            torch.set_num_threads(threads)
    method, mode, reference_mode = CASES[case]
    st = Settings(steps=STEPS, mode=mode, dtype=dtype, cg=CGConfig(scale=CG_SCALE),
                  gfcg=GFCGConfig(desired_class=0, reference_mode=reference_mode))
    tb = models(dtype)
    return sample(tb.main, guidance_classifier_for(tb, method, st), method, per_row_classes(n), n, seed=seed,
                  steps=st.steps, guide=tb.guide, cfg_scale=st.cfg_scale, atg_scale=st.atg_scale, gfcg=st.gfcg,
                  mode=st.mode, num_classes=NUM_CLASSES, cg=st.cg)


def trace_of(result) -> list:
    """The trace as plain tuples (step, sigma, p_des, omega / weight, references), compared exactly."""
    return [dataclasses.astuple(e) for e in result.trace]


def references(result) -> list:
    return [e.reference for e in result.trace]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def assert_identical(a, b, what: str) -> None:
    assert a.images.dtype == b.images.dtype and a.images.shape == b.images.shape
    assert torch.equal(a.images, b.images), f"{what}: same seed, max |difference| {max_diff(a.images, b.images):.3e}"
    assert trace_of(a) == trace_of(b), f"{what}: same seed, different traces"
    assert a.nfe == b.nfe


def assert_guidance_engaged(result, case: str) -> None:
    """Guards the tests' meaning: the GFCG cases must have had confused rows (reference branches ran)."""
    method = CASES[case][0]
    if method.startswith("gfcg"):
        assert any(r >= 0 for refs in references(result) for r in refs), f"{case}: GFCG never engaged"
    elif method in CG_METHODS:
        assert len(result.trace) == 2 * STEPS - 1        # one gradient per evaluation
    else:
        assert not result.trace


# ------------------------------------------------------------------------------------------------
# every method, one image

_FIRST = {}


def first_run(dtype, case, n=1):
    """The first run of a configuration at SEED, kept for the fresh-process comparison below."""
    key = (dtype, case, n)
    if key not in _FIRST:
        _FIRST[key] = run(dtype, case, SEED, n)
    return _FIRST[key]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_seed_bit_identical_every_method(dtype, case):
    a = first_run(dtype, case)
    b = run(dtype, case, SEED)
    assert a.images.shape == (1, 3, RESOLUTION, RESOLUTION) and torch.isfinite(a.images).all()
    assert_guidance_engaged(a, case)
    assert_identical(a, b, f"{case} {dtype} n=1")
    c = run(dtype, case, OTHER_SEED)
    assert not torch.equal(a.images, c.images), f"{case} {dtype}: another seed gave the same image"
    if CASES[case][2] == "stochastic":
        assert references(a) != references(c), f"{case} {dtype}: another seed drew the same references"


# ------------------------------------------------------------------------------------------------
# batches with per-row desired classes


@pytest.mark.parametrize("case", BATCH_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_same_seed_bit_identical(dtype, case):
    a = first_run(dtype, case, N_BATCH)
    b = run(dtype, case, SEED, N_BATCH)
    assert a.images.shape == (N_BATCH, 3, RESOLUTION, RESOLUTION) and torch.isfinite(a.images).all()
    assert_guidance_engaged(a, case)
    assert_identical(a, b, f"{case} {dtype} n={N_BATCH}")
    # the rows asked for different classes from different noise: no row repeats another
    assert not any(torch.equal(a.images[i], a.images[j]) for i in range(N_BATCH) for j in range(i + 1, N_BATCH))


# ------------------------------------------------------------------------------------------------
# the stochastic reference: its generator is seeded from the noise seed


@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_reference_batch_same_seed_same_trace(dtype):
    case, n = "gfcg+cfg-swap-stochastic", N_BATCH
    a = first_run(dtype, case, n)
    b = run(dtype, case, SEED, n)
    assert_guidance_engaged(a, case)
    assert_identical(a, b, f"{case} {dtype} n={n}")
    assert references(a) == references(b)
    c = run(dtype, case, OTHER_SEED, n)
    assert references(a) != references(c), "another seed drew the same stochastic references"
    # every row of another seed's run differs (its noise is drawn for the whole batch)
    changed = (a.images != c.images).flatten(1).any(1)
    assert changed.all(), f"{case} {dtype}: rows {(~changed).nonzero().flatten().tolist()} unchanged by the seed"
    # the draws are real: the deterministic reference (argmax) picks other classes somewhere
    det = first_run(dtype, "gfcg+cfg-swap", n)
    assert references(det) != references(a)
    assert not torch.equal(det.images, a.images)


def _engine_references(seed, engine=None):
    """First-step references of the engine alone (uniform logits: all 32 rows confused, 9 choices each)."""
    eng = engine or GFCGEngine(GFCGConfig(desired_class=0, tau=1.0, reference_mode="stochastic"))
    x = torch.zeros(32, 3, 4, 4)
    eng.begin(torch.tensor([80.0, 10.0, 1.0, 0.0]), seed)

    def main_eval(branches):
        return [x if b.rows is None else x[b.rows] for b in branches]

    eng.denoise(x, 80.0, main_eval, lambda x0: torch.zeros(x0.shape[0], NUM_CLASSES))
    return eng.trace[0].reference


def test_stochastic_generator_is_seeded_by_the_run_seed():
    """Same noise, only the run's seed changes: the stochastic references follow the seed, and
    ``begin`` re-seeds an engine that already drew (so a reused guider repeats itself)."""
    ref = _engine_references(SEED)
    assert len(ref) == 32 and all(1 <= r < NUM_CLASSES for r in ref)
    assert _engine_references(SEED) == ref
    assert _engine_references(OTHER_SEED) != ref
    eng = GFCGEngine(GFCGConfig(desired_class=0, tau=1.0, reference_mode="stochastic"))
    _engine_references(OTHER_SEED, eng)
    assert _engine_references(SEED, eng) == ref


# ------------------------------------------------------------------------------------------------
# a fresh process reproduces the results

# (dtype, case, n): what a fresh process samples and hashes (first runs the tests above also make).
# float32 one-row batches are the thread-sensitive ones (see ``fresh``).
FRESH = [("float32", "gfcg+cfg-swap-stochastic", N_BATCH),
         ("bfloat16", "gfcg+atg-swap", N_BATCH),
         ("bfloat16", "cg", N_BATCH),
         ("float32", "gfcg-stochastic", 1)]


def digest(result) -> dict:
    """sha256 of the image tensor's bytes (with dtype and shape) and of the trace."""
    t = result.images.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return {"images": h.hexdigest(), "trace": hashlib.sha256(repr(trace_of(result)).encode()).hexdigest()}


def fresh_digests(cases) -> dict:
    """Run in the fresh process: digests of the first run of each case, and torch's thread counts."""
    return {"threads": [torch.get_num_threads(), torch.get_num_interop_threads()],
            "digests": [digest(first_run(*c)) for c in cases]}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """Digests from a fresh interpreter. It runs with this process's intra-op thread count (the torch
    default unless something changed it): the thread count is part of the configuration, since
    float32 CPU convolutions with 1x1 kernels, >= 128 input channels and batches below 16 sum in
    another order (last bits differ) with another number of threads. Likewise the flag that lets
    scaled_dot_product_attention's math path reduce bf16 in lower precision: importing ComfyUI
    turns it on (``allow_fp16_bf16_reduction_math_sdp(True)``), which changes bf16 results on the
    CPU, so the fresh process gets this process's setting."""
    here = Path(__file__).resolve().parent
    sdp = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    code = (f"import sys, json, torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp({sdp}); "
            f"sys.path.insert(0, {str(here)!r}); import test_determinism as T; "
            f"print('RESULT', json.dumps(T.fresh_digests({FRESH!r})))")
    cwd = tmp_path_factory.mktemp("fresh")     # not the repo root: its folders must not shadow modules
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=dict(os.environ), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("idx", range(len(FRESH)), ids=["-".join(map(str, c)) for c in FRESH])
def test_fresh_process_reproduces_in_process_result(fresh, idx):
    here = digest(first_run(*FRESH[idx]))
    threads = [torch.get_num_threads(), torch.get_num_interop_threads()]
    there = fresh["digests"][idx]
    # (the fresh process ran with this process's thread count and SDPA reduction flag)
    assert there["images"] == here["images"], \
        f"{FRESH[idx]}: images differ from a fresh process (threads here {threads}, there {fresh['threads']})"
    assert there["trace"] == here["trace"], f"{FRESH[idx]}: traces differ from a fresh process"
