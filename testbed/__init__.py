"""The pack's own testbed (framework-free): the analytic toy (``toy``), the ShapePairs dataset
(``dataset``), training code (``train``) and the headless sampler on the shared engine (``sampler``)."""
