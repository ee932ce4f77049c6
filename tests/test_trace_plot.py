"""Trace pictures and progress lines (framework-free)."""
import numpy as np

from comfyui_gfcg.guiders.engine import TraceEntry
from comfyui_gfcg.guiders.gradient import CGTraceEntry
from comfyui_gfcg.guiders.trace_plot import plot_trace, progress_line

NAMES = ["golden retriever, goldie", "tabby cat", "red fox", "school bus"]


def gfcg_trace():
    return [TraceEntry(0, 80.0, [0.1, 0.9], [3.2, 1.0], [1, -1]),
            TraceEntry(1, 40.0, [0.3, 0.95], [2.6, 1.0], [2, -1]),
            TraceEntry(2, 10.0, [0.6, 0.97], [1.0, 1.0], [-1, -1])]


def test_progress_line_names_the_reference_classes():
    tr = gfcg_trace()
    line = progress_line(tr[0], 18, NAMES, 0.5)
    assert line.startswith("step 1/18") and "confused 1/2" in line and "reference: tabby cat x1" in line
    assert "all 2 confident (tau 0.5)" in progress_line(tr[2], 18, NAMES, 0.5)
    assert "weight 0.004" in progress_line(CGTraceEntry(0, 80.0, [0.2, 0.4], 0.004), 10, NAMES, 0.0)


def test_plot_is_an_rgb_image_of_the_asked_size_and_shows_data():
    img = plot_trace(gfcg_trace(), NAMES, desired=0, tau=0.5, width_px=800, height_px=500)
    assert img.shape == (500, 800, 3) and img.dtype == np.uint8
    empty = plot_trace([], NAMES, 0, 0.5, width_px=800, height_px=500)
    assert empty.shape == img.shape
    assert (img != empty).mean() > 0.02                    # the curves, markers and legend are drawn
    cg = plot_trace([CGTraceEntry(i, 80.0 / (i + 1), [0.2 + 0.1 * i], 0.004) for i in range(5)], NAMES, 1, None)
    assert cg.shape == (560, 1000, 3)
