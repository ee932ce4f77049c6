"""The latent-model cost benchmark's machinery on real ComfyUI, at a tiny size: the shipped GFCG +
ATG costs ATG's NFE, classifies only on its schedule, takes TAESD when it is there and the full
VAE when not; the former additive setting costs more evaluations; a run leaves no folder behind."""
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfy


def test_latent_perf_rows_count_what_they_should(env):
    from comfyui_gfcg.testbed import perf_latent as L

    cfg = L.LatentPerfConfig(batch=1, steps=2, reps=1, main="tiny", guide="tiny")
    made = set(Path(tempfile.gettempdir()).glob("gfcg_perf_*"))
    res = L.run(cfg, progress=lambda *_: None)
    import folder_paths
    assert set(Path(tempfile.gettempdir()).glob("gfcg_perf_*")) <= made        # its TAESD folders are deleted
    assert not any("gfcg_perf_" in p for p in folder_paths.get_folder_paths("vae_approx"))   # and unregistered
    by = {r["row"]: r for r in res["rows"]}
    atg = by["ATG"]
    assert atg["classifier_rows_per_image"] == 0 and atg["nfe"] == 2 * 2 * 2    # 2 Heun steps, main + guide
    for label, dec in (("GFCG+ATG shipped, TAESD present", "taesd"), ("GFCG+ATG shipped, no TAESD (full VAE)", "vae")):
        r = by[label]
        assert r["decoder"] == dec
        assert r["nfe"] == atg["nfe"] and r["main_nfe"] == atg["main_nfe"]      # swap: ATG's evaluations
        assert r["classifier_rows_per_image"] == 1                              # period 2: step 0 of 2
    before = by["GFCG+ATG before (additive, every step, VAE x0.5)"]
    assert before["nfe"] > atg["nfe"] and before["classifier_rows_per_image"] == 2
    assert [t["met"] for t in res["targets"] if t["measure"] == "nfe"] == [True, True]
    assert "| ATG |" in L.markdown(res)
