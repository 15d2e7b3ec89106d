"""Export a model to a bundle: FP ONNX components, their parity with PyTorch, the manifest.

The bundle is assembled in a temporary directory beside the target and renamed into place
only when complete, so an interrupted export never leaves a bundle that looks finished.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..models.configs import ModelSpec
from ..models.denoiser import OUTPUT, Denoiser, load_denoiser
from ..runtime.bundle import FORMAT, MANIFEST, sha256_file, write_json_atomic
from .onnx_export import ExportedGraph, export_module

# diffusers scheduler classes that the runtime reproduces, by effgen name.
_SCHEDULER_NAMES = {"DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpm++2m",
                    "FlowMatchEulerDiscreteScheduler": "flow-euler"}


def _component(graph: ExportedGraph, timesteps: list[int] | None = None, **extra) -> dict:
    variant = {"onnx": graph.onnx, "engines": {}}
    if timesteps is not None:
        variant["timesteps"] = timesteps
    return {"inputs": graph.inputs, "outputs": graph.outputs, "external_data": graph.external_data,
            "variants": [variant], "max_abs_error": graph.max_abs_error,
            "tolerance": graph.tolerance, **extra}


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent / self.vae.config.scaling_factor, return_dict=False)[0]


def scheduler_config(spec: ModelSpec, checkpoint: Path | None) -> dict:
    """The checkpoint's own scheduler when the runtime has it, else the model's default."""
    path = checkpoint / "scheduler" / "scheduler_config.json" if checkpoint else None
    if path is None or not path.is_file():
        return dict(spec.scheduler)
    cfg = json.loads(path.read_text())
    name = _SCHEDULER_NAMES.get(cfg.get("_class_name"))
    if name is None:
        return dict(spec.scheduler)
    from ..runtime.schedulers import make_scheduler

    # Resolve through the runtime class: unknown keys dropped, unsupported options refused.
    return make_scheduler({**cfg, "name": name}).config


def pixels_per_latent(spec: ModelSpec, checkpoint: Path | None) -> int:
    """1 for pixel-space models; else the VAE's downsampling (from its config when the
    checkpoint has one)."""
    if not spec.latent_space:
        return 1
    cfg = checkpoint / "vae" / "config.json" if checkpoint else None
    if cfg is not None and cfg.is_file():
        return 2 ** (len(json.loads(cfg.read_text())["block_out_channels"]) - 1)
    return spec.vae_scale_factor


def model_entry(spec: ModelSpec, sample_size: int, factor: int) -> dict:
    return {
        "name": spec.name, "family": spec.family, "in_channels": spec.in_channels,
        "sample_size": sample_size, "latent_space": spec.latent_space,
        "resolution": sample_size * factor,
        "learned_sigma": spec.learned_sigma, "num_classes": spec.num_classes,
        "text": None if spec.text is None else {"encoder": spec.text.encoder,
                                                 "max_length": spec.text.max_length,
                                                 "dim": spec.text.dim},
    }


def export_bundle(model: str, out: Path, checkpoint: Path | None = None,
                  resolution: int | None = None, batch: int = 2,
                  log: Callable[[str], None] = print, quantize: dict | None = None) -> Path:
    """Export `model` into the bundle directory `out` (replaced if it exists).

    `quantize`: keyword arguments of `quantized.prepare_quantization` (plan, scales_dir,
    target, n_calib, calib_steps): the denoiser becomes one QDQ graph per
    timestep group sharing one weight file, with plan.json and scales.safetensors."""
    from ..models.configs import get_spec

    if get_spec(model).family == "ecar":  # two components, one graph per stage each
        from .ecar_export import export_ecar_bundle

        if checkpoint is not None or resolution is not None:
            raise ValueError(f"{model}: ECAR models export from their shipped weights at their "
                             "own resolution (no --checkpoint / --resolution)")
        return export_ecar_bundle(model, out, batch=batch, log=log, quantize=quantize)
    out = Path(out)
    checkpoint = Path(checkpoint) if checkpoint else None
    denoiser: Denoiser = load_denoiser(model, checkpoint)
    spec = denoiser.spec
    sample_size = spec.sample_size
    factor = pixels_per_latent(spec, checkpoint)
    if resolution is not None:
        if resolution % (factor * spec.transformer["patch_size"]):
            raise ValueError(f"--resolution {resolution} must be a multiple of "
                             f"{factor * spec.transformer['patch_size']} for {spec.name}")
        sample_size = resolution // factor
    quant = None
    if quantize is not None:
        from .quantized import prepare_quantization

        quant = prepare_quantization(denoiser, log=log, **quantize)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        components = {}
        log(f"exporting denoiser of {spec.name} ({sum(p.numel() for p in denoiser.parameters()) / 1e6:.1f}M parameters, "
            f"{sample_size}x{sample_size}x{spec.in_channels}, batch {batch})")
        if quant is not None:
            from .quantized import export_quantized_denoiser

            components["denoiser"] = export_quantized_denoiser(denoiser, quant, batch, sample_size,
                                                               work, log, OUTPUT)
        else:
            graph = export_module(denoiser, denoiser.example_inputs(batch, sample_size=sample_size),
                                  denoiser.input_names, [OUTPUT], work, "denoiser")
            n_train = spec.scheduler["num_train_timesteps"]
            components["denoiser"] = _component(graph, timesteps=[0, n_train - 1])
            log(f"  denoiser.onnx: ONNX Runtime vs PyTorch max error {graph.max_abs_error:.2e}")

        if spec.text is not None and spec.text.encoder == "minilm":
            components["text_encoder"] = _export_minilm(spec, batch, work, log)
        vae_dir = checkpoint / "vae" if checkpoint else None
        if vae_dir is not None and (vae_dir / "config.json").is_file():
            components["vae_decoder"] = _export_vae(checkpoint, spec, sample_size, work, log)

        files = {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "model": model_entry(spec, sample_size, factor),
            "components": components,
            "scheduler": scheduler_config(spec, checkpoint),
            "sampling": {"steps": spec.steps, "guidance": spec.guidance,
                         "guidance_interval": (None if spec.guidance_interval is None
                                               else list(spec.guidance_interval)),
                         "batch": batch},
            "files": files,
            "provenance": {
                "effgen": _version(), "torch": torch.__version__,
                "checkpoint": str(checkpoint) if checkpoint else (
                    f"shipped:{spec.weights}" if spec.weights else "random-init(seed=0)"),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(),
            },
        }
        write_json_atomic(work / MANIFEST, manifest)
        os.chmod(work, 0o755)  # mkdtemp makes it private; a bundle is meant to be copied
        _replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _export_minilm(spec: ModelSpec, batch: int, work: Path, log) -> dict:
    from ..models.text_encoder import MiniLMEncoder, minilm_path, tokenize

    encoder = MiniLMEncoder()
    ids, mask = tokenize(["a small red circle at the top left on a grey background", ""][:batch]
                         + [""] * max(0, batch - 2), spec.text.max_length)
    graph = export_module(encoder, (ids, mask), ["input_ids", "attention_mask"],
                          ["encoder_hidden_states"], work, "text_encoder")
    shutil.copyfile(minilm_path() / "tokenizer.json", work / "tokenizer.json")
    log(f"  text_encoder.onnx (all-MiniLM-L6-v2): max error {graph.max_abs_error:.2e}")
    return _component(graph, tokenizer="tokenizer.json", max_length=spec.text.max_length)


def _export_vae(checkpoint: Path, spec: ModelSpec, sample_size: int, work: Path, log) -> dict:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae", local_files_only=True,
                                        use_safetensors=True).float().eval()
    latent = torch.randn(1, vae.config.latent_channels, sample_size, sample_size,
                         generator=torch.Generator().manual_seed(0))
    graph = export_module(_VaeDecoder(vae), (latent,), ["latent"], ["image"], work, "vae_decoder")
    log(f"  vae_decoder.onnx: max error {graph.max_abs_error:.2e}")
    return _component(graph, scaling_factor=vae.config.scaling_factor)


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished bundle into place; an old bundle is removed only after that."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _version() -> str:
    from .. import __version__

    return __version__
