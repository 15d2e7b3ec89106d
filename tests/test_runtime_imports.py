"""effgen.runtime runs on a device without torch and diffusers."""

from __future__ import annotations

def test_runtime_generates_with_torch_and_diffusers_unimportable(tiny_bundles, run_torch_free):
    bundle = str(tiny_bundles["dit-tiny"])
    run_torch_free(f"""
        from effgen import runtime
        images = runtime.generate({bundle!r}, class_label=1, steps=2)
        assert images.shape == (1, 16, 16, 3), images.shape
        # every runtime module imports (TensorRT's and CUDA's are loaded only when used)
        import importlib, pkgutil
        for m in pkgutil.iter_modules(runtime.__path__):
            importlib.import_module("effgen.runtime." + m.name)
        from effgen.runtime.compare import compare_backends
        rows = compare_backends({bundle!r}, "ort-reference", "ort", steps=2)
        assert rows and all(r.sqnr_db > 60 for r in rows), rows
    """)
