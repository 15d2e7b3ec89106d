"""One denoiser interface over diffusers' PixArt and DiT transformers.

`Denoiser.forward` takes plain tensors with fixed names (`INPUTS[family]`) and returns the raw
model output (with the learned-sigma channels, when the model has them). These names become
the ONNX graph's input names and the runtime feeds them, so every stage agrees on them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .configs import ModelSpec, get_spec

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

INPUTS = {
    "pixart": ("sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"),
    "dit": ("sample", "timestep", "class_labels"),
}
OUTPUT = "model_output"


class Denoiser(torch.nn.Module):
    """A diffusers transformer behind the fixed effgen input names.

    `transformer` is the diffusers module itself, so module paths inside it
    (`transformer.transformer_blocks.0.attn1.to_q`) are what plans name.
    """

    def __init__(self, spec: ModelSpec, transformer: torch.nn.Module):
        super().__init__()
        self.spec = spec
        self.transformer = transformer
        self.checkpoint: Path | None = None  # the local diffusers folder the weights came from

    @property
    def input_names(self) -> tuple[str, ...]:
        return INPUTS[self.spec.family]

    def forward(self, sample, timestep, cond, cond_mask=None):
        if self.spec.family == "dit":
            return self.transformer(sample, timestep=timestep, class_labels=cond,
                                    return_dict=False)[0]
        added = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:
            # PixArt-alpha 1024 conditions on the image size; shapes are fixed, so it is constant.
            b, res = sample.shape[0], float(self.spec.resolution)
            added = {"resolution": sample.new_tensor([[res, res]]).expand(b, 2),
                     "aspect_ratio": sample.new_ones(b, 1)}
        return self.transformer(sample, encoder_hidden_states=cond, timestep=timestep,
                                encoder_attention_mask=cond_mask, added_cond_kwargs=added,
                                return_dict=False)[0]

    def example_inputs(self, batch: int, sample_size: int | None = None,
                       seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Inputs of the right shapes and dtypes (used for export and its parity check)."""
        g = torch.Generator().manual_seed(seed)
        s = self.spec
        size = sample_size or s.sample_size
        sample = torch.randn(batch, s.in_channels, size, size, generator=g)
        timestep = torch.full((batch,), 500.0)
        if s.family == "dit":
            labels = torch.randint(0, s.num_classes, (batch,), generator=g)
            return sample, timestep, labels
        states = torch.randn(batch, s.text.max_length, s.text.dim, generator=g)
        mask = torch.ones(batch, s.text.max_length)
        mask[:, s.text.max_length // 2:] = 0  # exercise the padding path
        return sample, timestep, states, mask


def torch_device(name: str) -> torch.device:
    """The torch device `name` (cpu, cuda, cuda:1, ...), or a one-line error where it is not
    one or this machine has no such device."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: torch sees no CUDA device here")
    return dev


def _transformer_class(family: str):
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    return {"pixart": PixArtTransformer2DModel, "dit": DiTTransformer2DModel}[family]


def build_denoiser(spec: ModelSpec, seed: int = 0) -> Denoiser:
    """The architecture with seeded random weights."""
    torch.manual_seed(seed)
    return Denoiser(spec, _transformer_class(spec.family)(**spec.transformer)).eval()


def read_checkpoint_config(checkpoint: Path) -> dict:
    path = Path(checkpoint) / "transformer" / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a diffusers model folder: no transformer/config.json")
    return json.loads(path.read_text())


def load_denoiser(name: str, checkpoint: str | Path | None = None, seed: int = 0) -> Denoiser:
    """A named model: weights from a local diffusers folder, the shipped reference weights,
    or (for the real architectures without a checkpoint) seeded random weights."""
    spec = get_spec(name)
    if checkpoint is not None:
        read_checkpoint_config(checkpoint)  # a clear error for a folder that is not a model
        cls = _transformer_class(spec.family)
        transformer = cls.from_pretrained(Path(checkpoint), subfolder="transformer",
                                          local_files_only=True, use_safetensors=True)
        # The checkpoint's own config is the truth about its architecture.
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        spec = dataclasses.replace(spec, transformer=config, weights=None)
        model = Denoiser(spec, transformer.float()).eval()
        model.checkpoint = Path(checkpoint)
        return model
    model = build_denoiser(spec, seed)
    if spec.weights is not None:
        path = WEIGHTS_DIR / spec.weights
        if not path.is_file():
            raise FileNotFoundError(f"{name}: shipped weights {path} are missing; "
                                    "train them with samples/train_reference.py")
        model.transformer.load_state_dict(load_file(path))
    return model
