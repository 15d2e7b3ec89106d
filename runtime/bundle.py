"""The bundle: a directory with `manifest.json`, ONNX graphs, their weights and (once built)
TensorRT engines, which can be copied to a device and run there without the source model.

The manifest is the contract between the exporter, the engine builder and the runtime
(DESIGN §2). Every file it names is relative to the bundle, stays inside it, and has its
sha256 recorded. Loading refuses anything else with a one-line `BundleError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT = "effgen.bundle/1"
MANIFEST = "manifest.json"


class BundleError(Exception):
    """A bundle that cannot be used; the message is one line and names the problem."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same directory, then rename over the target, so a
    reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a manifest is meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def inside(root: Path, rel: str) -> Path:
    """`root/rel`, refusing absolute paths and paths that leave `root` (also through links)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise BundleError(f"path {rel!r} in the manifest must be relative to the bundle")
    root = root.resolve()
    full = (root / rel).resolve()
    if full != root and root not in full.parents:
        raise BundleError(f"path {rel!r} in the manifest leaves the bundle")
    return full


class Bundle:
    """A loaded, checked bundle. `components[name]` is the manifest entry of a component."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest

    @classmethod
    def load(cls, root: str | Path, verify_hashes: bool = True) -> "Bundle":
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"{root} is not a bundle directory")
        if not path.is_file():
            raise BundleError(f"{root} has no {MANIFEST}: not an effgen bundle (or an export "
                              "that did not finish)")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{path} must hold a JSON object")
        fmt = manifest.get("format")
        if fmt != FORMAT:
            raise BundleError(f"{path}: unknown manifest format {fmt!r}; this effgen reads {FORMAT!r}")
        for key in ("model", "components", "files", "scheduler", "sampling"):
            if key not in manifest:
                raise BundleError(f"{path}: missing field '{key}'")
        bundle = cls(root, manifest)
        for rel in bundle.referenced_files():
            if rel not in manifest["files"]:
                raise BundleError(f"{path}: file '{rel}' is used but has no sha256 under 'files'")
        for rel in manifest["files"]:
            inside(root, rel)
        if verify_hashes:
            bundle.verify()
        return bundle

    def referenced_files(self) -> list[str]:
        """Every file a component entry points at."""
        files = []
        for comp in self.manifest["components"].values():
            for v in comp.get("variants", []):
                files.append(v["onnx"])
                files.extend(v.get("engines", {}).values())
            for key in ("external_data", "tokenizer"):
                if comp.get(key):
                    files.append(comp[key])
        return files

    def verify(self) -> None:
        """Check that every recorded file exists and has its recorded sha256."""
        for rel, expected in self.manifest["files"].items():
            full = inside(self.root, rel)
            if not full.is_file():
                raise BundleError(f"{self.root}: file '{rel}' is missing")
            actual = sha256_file(full)
            if actual != expected:
                raise BundleError(f"{self.root}: file '{rel}' does not match its sha256 in the "
                                  "manifest (truncated, altered or from another export)")

    def path(self, rel: str) -> Path:
        return inside(self.root, rel)

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return self.manifest["components"]

    def component(self, name: str) -> dict[str, Any]:
        if name not in self.components:
            raise BundleError(f"{self.root}: no '{name}' component "
                              f"(has: {', '.join(self.components)})")
        return self.components[name]
