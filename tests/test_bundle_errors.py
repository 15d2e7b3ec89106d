"""Bad bundles and bad input end in one clean line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from effgen.runtime.bundle import Bundle, BundleError


@pytest.fixture
def bundle_copy(tiny_bundles, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["dit-tiny"], dst)
    return dst


def edit_manifest(bundle, change):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def run_cli(*args):
    """The installed CLI in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "effgen.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_verify_accepts_a_good_bundle(bundle_copy):
    proc = run_cli("verify", bundle_copy)
    assert proc.returncode == 0 and "4 files match" in proc.stdout


def _truncate(b):
    data = (b / "denoiser.weights").read_bytes()
    (b / "denoiser.weights").write_bytes(data[: len(data) // 2])


def _alter(b):
    data = bytearray((b / "denoiser.weights").read_bytes())
    data[100] ^= 0xFF
    (b / "denoiser.weights").write_bytes(bytes(data))


def _leave(b):
    def change(m):
        m["files"]["../outside.onnx"] = m["files"].pop("denoiser.onnx")
        m["components"]["denoiser"]["variants"][0]["onnx"] = "../outside.onnx"
    edit_manifest(b, change)


def _absolute(b):
    def change(m):
        m["files"]["/etc/passwd"] = "0" * 64
    edit_manifest(b, change)


@pytest.mark.parametrize("damage, fragments", [
    (lambda b: (b / "denoiser.weights").unlink(), ["'denoiser.weights' is missing"]),
    (_truncate, ["'denoiser.weights' does not match its sha256"]),
    (_alter, ["'denoiser.weights' does not match its sha256"]),
    (_leave, ["leaves the bundle"]),
    (_absolute, ["must be relative"]),
    (lambda b: edit_manifest(b, lambda m: m.update(format="effgen.bundle/99")),
     ["unknown manifest format 'effgen.bundle/99'"]),
    (lambda b: (b / "manifest.json").write_text("{not json"), ["not valid JSON"]),
    (lambda b: (b / "manifest.json").unlink(), ["no manifest.json"]),
    (lambda b: edit_manifest(b, lambda m: m.pop("components")), ["missing field 'components'"]),
], ids=["missing", "truncated", "altered", "path-leaves", "absolute-path", "format-version",
        "not-json", "no-manifest", "missing-field"])
def test_damaged_bundle_gives_one_line_error(bundle_copy, damage, fragments):
    damage(bundle_copy)
    with pytest.raises(BundleError):
        Bundle.load(bundle_copy)
    assert_clean_error(run_cli("verify", bundle_copy), *fragments)
    assert_clean_error(run_cli("generate", bundle_copy, "--class-label", "1", "--out",
                               bundle_copy / "out"), *fragments)


def test_generate_rejects_bad_input(tiny_bundles, tmp_path):
    dit = tiny_bundles["dit-tiny"]
    assert_clean_error(run_cli("generate", dit, "--class-label", "99", "--out", tmp_path),
                       "class labels must be in 0..9")
    assert_clean_error(run_cli("generate", tiny_bundles["pixart-tiny"], "--prompt", "a cat",
                               "--out", tmp_path), "no text_encoder component")
    assert_clean_error(run_cli("generate", dit, "--class-label", "1", "--steps", "0",
                               "--out", tmp_path), "steps must be at least 1")
    assert_clean_error(run_cli("generate", dit, "--class-label", "1", "--guidance-interval",
                               "500", "0", "--out", tmp_path), "must satisfy 0 <= lo <= hi")
    assert_clean_error(run_cli("verify", tmp_path / "nothing"), "is not a bundle directory")


def test_export_rejects_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "effgen.exporter.cli", "pixart-alpha-5l2",
                           "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert_clean_error(proc, "unknown model 'pixart-alpha-5l2'", "did you mean pixart-alpha-512")
    proc = subprocess.run([sys.executable, "-m", "effgen.exporter.cli", "dit-tiny",
                           "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert_clean_error(proc, "does not exist")
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "effgen.exporter.cli", "dit-tiny",
                           "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert_clean_error(proc, "no transformer/config.json")
    assert not (tmp_path / "b").exists()


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch, tiny_checkpoints):
    """A failure after the denoiser was written must not leave a bundle or a partial dir."""
    from effgen.exporter import export

    def broken_vae(*args, **kwargs):
        raise RuntimeError("simulated failure while exporting the VAE")

    monkeypatch.setattr(export, "_export_vae", broken_vae)
    with pytest.raises(RuntimeError, match="simulated failure"):
        export.export_bundle("dit-tiny", tmp_path / "bundle",
                             checkpoint=tiny_checkpoints["dit-tiny"], log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_reexport_replaces_a_bundle_whole(tmp_path, tiny_checkpoints):
    from effgen.exporter.export import export_bundle

    out = tmp_path / "bundle"
    export_bundle("dit-tiny", out, log=lambda _: None)  # random weights, no VAE
    (out / "stray.txt").write_text("left from before")
    export_bundle("dit-tiny", out, checkpoint=tiny_checkpoints["dit-tiny"], log=lambda _: None)
    assert not (out / "stray.txt").exists()
    assert "vae_decoder" in Bundle.load(out).components
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
