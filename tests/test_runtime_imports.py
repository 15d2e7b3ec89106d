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
        leaked = [m for m in ("torch", "diffusers", "transformers") if sys.modules.get(m)]
        assert not leaked, leaked
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
