"""The attribute classifier: the judge of generated reference images (DESIGN §8).

A small CNN over 32x32 RGB pictures of models/refdata.py with one head per attribute (shape,
colour, size, position = row*3+col, background). Two uses:

- alignment: does a generated picture show what its prompt asked for (`predict`)?
- distribution: the Fréchet distance between generated and real pictures is computed on its
  penultimate features (`features`), our stand-in for FID's Inception features.

The weights ship as models/weights/attr-classifier.safetensors, trained by
samples/train_classifier.py. Images go in as uint8 (N, 32, 32, 3); normalisation is inside.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import refdata
from .denoiser import WEIGHTS_DIR

WEIGHTS_FILE = WEIGHTS_DIR / "attr-classifier.safetensors"
HEADS: dict[str, int] = {
    "shape": len(refdata.SHAPES),
    "colour": len(refdata.COLOURS),
    "size": len(refdata.SIZES),
    "position": len(refdata.ROWS) * len(refdata.COLS),
    "background": len(refdata.BACKGROUNDS),
}
FEATURE_DIM = 128


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """Conv stack 32 -> 16 -> 8 -> 4 pixels, then a fully connected layer to the feature vector.

    The last feature map is flattened rather than globally pooled: position is one of the
    attributes, and a global pool would throw away where the shape is.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.trunk = nn.Sequential(
            _conv_block(3, 24), _conv_block(24, 32), nn.MaxPool2d(2),   # 16x16
            _conv_block(32, 48), _conv_block(48, 48), nn.MaxPool2d(2),  # 8x8
            _conv_block(48, 64), nn.MaxPool2d(2),                       # 4x4
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim),
                                   nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in HEADS.items()})

    @staticmethod
    def normalise(images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of uint8 images (N, 32, 32, 3)."""
        return self.embed(self.trunk(self.normalise(images)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for uint8 images (N, 32, 32, 3)."""
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}


_loaded: AttributeClassifier | None = None


def load_classifier(path: str | Path | None = None) -> AttributeClassifier:
    """The shipped classifier in eval mode. The default file is loaded once per process."""
    global _loaded
    from safetensors.torch import load_file

    if path is None and _loaded is not None:
        return _loaded
    file = Path(path) if path is not None else WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"attribute classifier weights {file} are missing; "
                                "train them with samples/train_classifier.py")
    model = AttributeClassifier()
    model.load_state_dict(load_file(str(file)))
    model.eval().requires_grad_(False)
    if path is None:
        _loaded = model
    return model


def classifier_metadata(path: str | Path | None = None) -> dict:
    """Training metadata stored in the weights file (accuracy per head, steps, seed, ...)."""
    from safetensors import safe_open

    file = Path(path) if path is not None else WEIGHTS_FILE
    with safe_open(str(file), "pt") as f:
        meta = dict(f.metadata() or {})
    if "val_accuracy" in meta:
        meta["val_accuracy"] = json.loads(meta["val_accuracy"])
    return meta


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    res = refdata.RESOLUTION
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (res, res, 3):
        raise ValueError(f"the attribute classifier takes uint8 images (N, {res}, {res}, 3), "
                         f"got {images.dtype} {tuple(images.shape)}")
    return images


def _in_batches(images: np.ndarray, batch: int, fn) -> list:
    images = _check_images(images)
    model = load_classifier()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            out.append(fn(model, torch.from_numpy(np.ascontiguousarray(images[start:start + batch]))))
    return out


def predict(images_uint8: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Predicted label per head (int64 arrays of length N), label numbering as in
    `refdata.Attributes.labels`."""
    parts = _in_batches(images_uint8, batch,
                        lambda m, x: {k: v.argmax(1).numpy() for k, v in m(x).items()})
    return {name: (np.concatenate([p[name] for p in parts]) if parts else np.zeros(0, np.int64))
            for name in HEADS}


def features(images_uint8: np.ndarray, batch: int = 256) -> np.ndarray:
    """Penultimate features (N, 128) float64, for the Fréchet distance."""
    parts = _in_batches(images_uint8, batch, lambda m, x: m.features(x).double().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, FEATURE_DIM))
