"""The pack's own testbed (framework-free). For now: an analytic toy problem (``toy``)."""
