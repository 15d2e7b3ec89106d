"""Quality metrics of generated images (DESIGN §8).

Fidelity against the FP model from identical noise: `psnr`, `ssim` (per image, on uint8 RGB).
Distribution and alignment on the reference models: `frechet_distance` on the features of the
shipped attribute classifier (models/classifier.py), our stand-in for FID, and
`attribute_accuracy` / `class_accuracy`, the fraction of images that show what was asked for,
our stand-in for a CLIP score. `evaluate_bundle` generates the evaluation set from a bundle
(and from its FP reference) and computes all of them; `effgen eval` and
samples/quality_table.py call it.

Infinite PSNR (identical images) stays `float("inf")` in Python; `to_json` writes it as the
string "inf" because JSON has no infinity, and never writes NaN (it becomes null).

psnr and ssim need only numpy and scipy; everything that uses the classifier imports torch
when called.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import linalg, ndimage

from .models import refdata

# SSIM constants of Wang et al. 2004 for 8-bit images.
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11x11 window
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2

# Real pictures for the Fréchet distance: drawn with a seed that neither the diffusion models
# (seed 0) nor the classifier (seeds 101, 202) were trained or validated on.
REAL_SEED = 777
REAL_PER_GENERATED = 4  # real pictures per generated image (at least 2, see real_images)


# --- fidelity ----------------------------------------------------------------------------


def _image_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Two uint8 images (H, W, 3) or batches (N, H, W, 3) as float64 batches; also whether the
    input was a single image."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images to compare must have the same shape, got {a.shape} and {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {a.dtype} and {b.dtype}")
    if a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"images must be (H, W, 3) or (N, H, W, 3), got {a.shape}")
    single = a.ndim == 3
    if single:
        a, b = a[None], b[None]
    return a.astype(np.float64), b.astype(np.float64), single


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Peak signal-to-noise ratio in dB per image (peak 255); inf where the images are equal.
    A batch (N, H, W, 3) gives an array of N values, one image a float."""
    a, b, single = _image_pair(a, b)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        values = np.where(mse == 0, np.inf, 10 * np.log10(255.0 ** 2 / mse))
    return float(values[0]) if single else values


def _gaussian_window() -> np.ndarray:
    taps = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    w = np.exp(-taps ** 2 / (2 * SSIM_SIGMA ** 2))
    return w / w.sum()


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The local SSIM of every window that lies fully inside the image, per channel:
    (N, H - 10, W - 10, 3) for uint8 batches (N, H, W, 3)."""
    a, b, _ = _image_pair(a, b)
    if min(a.shape[1:3]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1} pixels a side")
    window = _gaussian_window()

    def local_mean(x):
        # The 2-D Gaussian window is separable: filter rows, then columns.
        x = ndimage.correlate1d(x, window, axis=1, mode="reflect")
        return ndimage.correlate1d(x, window, axis=2, mode="reflect")

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a ** 2
    var_b = local_mean(b * b) - mu_b ** 2
    cov_ab = local_mean(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov_ab + SSIM_C2)
         / ((mu_a ** 2 + mu_b ** 2 + SSIM_C1) * (var_a + var_b + SSIM_C2)))
    # Windows that reach past the border see reflected pixels, not the image: drop them
    # (Wang et al.'s 'valid' filtering; skimage crops the same margin).
    r = SSIM_RADIUS
    return s[:, r:-r, r:-r, :]


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Structural similarity of Wang et al. 2004 per image: 11x11 Gaussian window with
    sigma 1.5, K1 = 0.01, K2 = 0.03, data range 255, population (not sample) statistics,
    mean over the valid windows and the three channels. Equals
    `skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=255)`. A batch (N, H, W, 3) gives N
    values, one image a float."""
    single = np.asarray(a).ndim == 3
    values = ssim_map(a, b).mean(axis=(1, 2, 3))
    return float(values[0]) if single else values


# --- distribution and alignment ----------------------------------------------------------


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D), the FID formula:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Like FID it is biased by the sample sizes: compare values computed from the same numbers
    of images only."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 feature vectors per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # The covariances are singular as a rule (classifier features have dead ReLU units, and
    # an evaluation set can have fewer images than feature dimensions). sqrtm still returns
    # the right root then (checked against an eigendecomposition), so its warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():
            # Should sqrtm fail on a singular product, a tiny ridge (as pytorch-fid adds)
            # makes the root well defined.
            ridge = np.eye(len(cov_a)) * 1e-6
            covmean = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    # sqrtm of a product of two PSD matrices is real in exact arithmetic; round-off leaves a
    # small imaginary part, which is dropped.
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
    return max(fd, 0.0)  # a distance: round-off below zero reads 0


def _predicted(images: np.ndarray, n_wanted: int, predicted: dict | None) -> dict[str, np.ndarray]:
    from .models.classifier import predict

    if len(images) != n_wanted:
        raise ValueError(f"got {len(images)} images for {n_wanted} conditions")
    if len(images) == 0:
        raise ValueError("no images to score")
    return predict(images) if predicted is None else predicted


def attribute_accuracy(images: np.ndarray, attrs: Sequence[refdata.Attributes],
                       predicted: dict | None = None) -> float:
    """Fraction of images whose shape, colour AND position (the classifier's reading) all
    match the requested attributes. Size and background are not scored: they are the
    attributes least tied to what quantization damages, and the shape/colour/position triple
    is what the held-out split tests. `predicted`: the classifier's reading, if already made."""
    return float(attributes_right(images, attrs, predicted).mean())


def attributes_right(images: np.ndarray, attrs: Sequence[refdata.Attributes],
                     predicted: dict | None = None) -> np.ndarray:
    """Per image: does it show the shape, colour and position asked for (attribute_accuracy's
    test)."""
    predicted = _predicted(images, len(attrs), predicted)
    wanted = refdata.labels_of(list(attrs))
    ok = np.ones(len(images), bool)
    for key in ("shape", "colour", "position"):
        ok &= predicted[key] == wanted[key]
    return ok


def class_accuracy(images: np.ndarray, class_ids: Sequence[int],
                   predicted: dict | None = None) -> float:
    """Fraction of images whose predicted (shape, colour) is the refdata class asked for."""
    return float(class_right(images, class_ids, predicted).mean())


def class_right(images: np.ndarray, class_ids: Sequence[int], predicted: dict | None = None) -> np.ndarray:
    """Per image: is its predicted (shape, colour) the class asked for."""
    class_ids = np.asarray(class_ids, np.int64)
    predicted = _predicted(images, len(class_ids), predicted)
    return predicted["shape"] * len(refdata.COLOURS) + predicted["colour"] == class_ids


def accuracy_by_attribute(predicted: dict[str, np.ndarray],
                          wanted: dict[str, np.ndarray]) -> dict[str, float]:
    """Fraction of images right in each attribute asked for (which one a model or its
    quantization loses: shape, colour, position, ...)."""
    return {k: float((predicted[k] == v).mean()) for k, v in wanted.items()}


def shape_confusion(predicted_shape: np.ndarray, wanted_shape: np.ndarray) -> list[list[int]]:
    """counts[i][j]: images asked for shape i that the classifier reads as shape j (both in
    refdata.SHAPES order): what a model draws in place of each shape."""
    k = len(refdata.SHAPES)
    counts = np.zeros((k, k), np.int64)
    np.add.at(counts, (np.asarray(wanted_shape), np.asarray(predicted_shape)), 1)
    return counts.tolist()


def evaluate(images: np.ndarray, reference_images: np.ndarray | None = None,
             attrs: Sequence[refdata.Attributes] | None = None,
             class_ids: Sequence[int] | None = None,
             real_images: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics that the given inputs allow, as a JSON-ready dict. Every key is present;
    a metric without its input is None:
    `psnr`, `ssim`: means over images against `reference_images` (same noise, FP model);
    `fd`: Fréchet distance of classifier features against `real_images`;
    `attr_acc`: against `attrs` (text-conditioned models); `attr_acc_heldout`: the same over
    the images whose attrs ask for a combination training never showed (None without any);
    `class_acc`: against `class_ids`;
    `acc_by_attribute`: each attribute's accuracy (with attrs or class ids);
    `shape_confusion`: shape asked x shape read, counts (with attrs or class ids);
    `acc_lost`, `acc_gained` (with reference images and attrs or class ids): images the
    reference shows right and these wrong, and the reverse (attributes for text prompts, the
    class otherwise). Accuracies of a quantized model and its FP reference are paired, image
    by image, so these counts say how much of an accuracy difference is a few flipped images;
    `n_images`. The mean PSNR is inf when an image equals its reference exactly."""
    images = np.asarray(images)
    result: dict[str, Any] = {"psnr": None, "ssim": None, "fd": None, "attr_acc": None,
                              "attr_acc_heldout": None, "class_acc": None,
                              "acc_by_attribute": None, "shape_confusion": None,
                              "acc_lost": None, "acc_gained": None, "n_images": int(len(images))}
    if reference_images is not None:
        result["psnr"] = float(np.mean(psnr(images, reference_images)))
        result["ssim"] = float(np.mean(ssim(images, reference_images)))
    if real_images is not None:
        from .models.classifier import features

        result["fd"] = frechet_distance(features(images), features(real_images))
    if attrs is not None or class_ids is not None:
        from .models.classifier import predict

        predicted = predict(images)
        if attrs is not None:
            ok = attributes_right(images, attrs, predicted)
            held = np.array([refdata.is_heldout(a) for a in attrs], bool)
            result["attr_acc"] = float(ok.mean())
            result["attr_acc_heldout"] = float(ok[held].mean()) if held.any() else None
            wanted = refdata.labels_of(list(attrs))
        else:
            shape, colour = np.divmod(np.asarray(class_ids, np.int64), len(refdata.COLOURS))
            wanted = {"shape": shape, "colour": colour}
        if class_ids is not None:
            result["class_acc"] = class_accuracy(images, class_ids, predicted)
        result["acc_by_attribute"] = accuracy_by_attribute(predicted, wanted)
        result["shape_confusion"] = shape_confusion(predicted["shape"], wanted["shape"])
        if reference_images is not None:
            def right(imgs, pred):
                return (attributes_right(imgs, attrs, pred) if attrs is not None
                        else class_right(imgs, class_ids, pred))

            ok = right(images, predicted)
            ok_ref = right(reference_images, predict(np.asarray(reference_images)))
            result["acc_lost"] = int((ok_ref & ~ok).sum())
            result["acc_gained"] = int((~ok_ref & ok).sum())
    return result


# --- bundles -----------------------------------------------------------------------------


def real_images(n_images: int) -> np.ndarray:
    """The real pictures the Fréchet distance of `n_images` generated ones is measured
    against: REAL_PER_GENERATED per generated image, half from the training split and half
    from the held-out split, the same mixture as `refdata.eval_prompts`. Seeded (REAL_SEED),
    so every evaluation with the same n_images compares against the same pictures."""
    n_real = REAL_PER_GENERATED * n_images
    seen, _ = refdata.make_dataset(n_real - n_real // 2, "train", seed=REAL_SEED)
    held, _ = refdata.make_dataset(n_real // 2, "heldout", seed=REAL_SEED)
    return np.concatenate([seen, held])


def _generate(pipe, conditions: dict[str, list], n_images: int, seed: int, steps: int,
              guidance: float, desc: str, progress: bool, chunk: int = 8,
              guidance_interval: tuple[float, float] | None = None) -> np.ndarray:
    """`n_images` images, `chunk` at a time so the bar counts images. Image i is seeded
    seed + i whatever the chunking, so the images equal those of one big call."""
    from tqdm import tqdm

    out = []
    with tqdm(total=n_images, desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, n_images, chunk):
            k = min(chunk, n_images - start)
            cond = {name: values[start:start + k] for name, values in conditions.items()}
            out.append(pipe.generate(num_images=k, seed=seed + start, steps=steps,
                                     guidance=guidance, guidance_interval=guidance_interval,
                                     **cond))
            bar.update(k)
    return np.concatenate(out)


def evaluate_bundle(bundle: str | Path, reference: str | Path | None = None, n_images: int = 64,
                    seed: int = 0, threads: int = 0, steps: int | None = None,
                    guidance: float | None = None, progress: bool = True,
                    guidance_interval: tuple[float, float] | None = None) -> dict[str, Any]:
    """Generate the evaluation set from `bundle` (and, with `reference`, the same images from
    the FP reference bundle: same prompts or labels, same seeds, steps and guidance) and
    compute every metric. `steps`, `guidance` and `guidance_interval` (PixArt and DiT
    bundles) default to the bundle's sampling settings.

    Prompts: `refdata.eval_prompts(n_images)`: captions for text-conditioned bundles
    (pixart), their class ids for class-conditional ones (dit). Returns `evaluate`'s keys
    (`attr_acc` is None for dit; `class_acc` is reported for both families) plus what was run.
    `threads` sets ONNX Runtime's threads and, when > 0, torch's for the classifier."""
    from .runtime import load_pipeline

    if n_images < 2:
        raise ValueError("n_images (--n-images) must be at least 2: the Fréchet distance needs a covariance")
    t0 = time.perf_counter()
    pipe = load_pipeline(bundle, threads=threads)
    model = pipe.model
    if model["resolution"] != refdata.RESOLUTION or model["in_channels"] != 3 or model["latent_space"]:
        raise ValueError(f"{bundle}: effgen eval scores the reference models (pixel-space "
                         f"{refdata.RESOLUTION}x{refdata.RESOLUTION} pictures of refdata); this "
                         f"bundle makes {model['resolution']}x{model['resolution']} images of "
                         f"{model['name']}")
    if model["family"] == "dit" and model["num_classes"] != refdata.NUM_CLASSES:
        raise ValueError(f"{bundle}: a class-conditional reference model has "
                         f"{refdata.NUM_CLASSES} classes, this one {model['num_classes']}")
    ref_pipe = None
    if reference is not None:
        ref_pipe = load_pipeline(reference, threads=threads)
        for key in ("family", "resolution", "in_channels", "num_classes"):
            if ref_pipe.model[key] != model[key]:
                raise ValueError(f"{reference} is not a reference for {bundle}: {key} "
                                 f"{ref_pipe.model[key]!r} != {model[key]!r}")
    if threads > 0:
        import torch

        torch.set_num_threads(threads)

    # Both bundles sample with the evaluated bundle's settings, so only the weights differ.
    if model["family"] == "ecar":
        sampling = pipe.bundle.manifest["sampling"]
        steps = int(steps or sampling["steps"])
        guidance = float(sampling["guidance"] if guidance is None else guidance)
        if guidance_interval is not None:
            raise ValueError(f"{bundle}: an ECAR bundle takes no guidance interval")
    else:
        steps, guidance, guidance_interval = pipe.sampling_defaults(steps, guidance,
                                                                    guidance_interval)
    prompts = refdata.eval_prompts(n_images)
    class_ids = [a.class_id for a in prompts]
    if model["family"] == "pixart":
        conditions = {"prompt": [a.caption for a in prompts]}
    else:
        conditions = {"class_label": class_ids}

    images = _generate(pipe, conditions, n_images, seed, steps, guidance,
                       Path(bundle).name, progress, guidance_interval=guidance_interval)
    reference_images = None
    if ref_pipe is not None:
        reference_images = _generate(ref_pipe, conditions, n_images, seed, steps, guidance,
                                     f"{Path(reference).name} (reference)", progress,
                                     guidance_interval=guidance_interval)
    real = real_images(n_images)
    result = evaluate(images, reference_images=reference_images,
                      attrs=prompts if model["family"] == "pixart" else None,
                      class_ids=class_ids, real_images=real)
    result.update({
        "model": model["name"], "family": model["family"], "bundle": str(bundle),
        "reference": None if reference is None else str(reference),
        "seed": seed, "steps": steps, "guidance": guidance,
        "guidance_interval": None if guidance_interval is None else list(guidance_interval),
        "n_real": int(len(real)),
        "seconds": round(time.perf_counter() - t0, 1),
    })
    return result


# --- JSON --------------------------------------------------------------------------------


def _json_ready(value: Any) -> Any:
    """inf -> "inf", -inf -> "-inf", NaN -> None, numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def to_json(result: dict[str, Any]) -> str:
    """Strict JSON (no NaN or Infinity tokens); infinite PSNR is written as "inf"."""
    return json.dumps(_json_ready(result), indent=2, allow_nan=False) + "\n"


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    Path(path).write_text(to_json(result))
