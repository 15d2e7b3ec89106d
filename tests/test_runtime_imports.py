"""effgen.runtime runs on a device without torch and diffusers."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_runtime_generates_with_torch_and_diffusers_unimportable(tiny_bundles):
    code = textwrap.dedent(f"""
        import sys
        # None in sys.modules makes `import torch` raise ImportError, as on a bare device.
        for name in ("torch", "diffusers", "transformers"):
            sys.modules[name] = None
        from effgen import runtime
        images = runtime.generate({str(tiny_bundles["dit-tiny"])!r}, class_label=1, steps=2)
        assert images.shape == (1, 16, 16, 3), images.shape
        # every runtime module imports (TensorRT's and CUDA's are loaded only when used)
        import importlib, pkgutil
        for m in pkgutil.iter_modules(runtime.__path__):
            importlib.import_module("effgen.runtime." + m.name)
        from effgen.runtime.compare import compare_backends
        rows = compare_backends({str(tiny_bundles["dit-tiny"])!r}, "ort-reference", "ort", steps=2)
        assert rows and all(r.sqnr_db > 60 for r in rows), rows
        leaked = [m for m in ("torch", "diffusers", "transformers") if sys.modules.get(m)]
        assert not leaked, leaked
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
