"""Quality metrics: PSNR/SSIM against hand-checked values, the Fréchet distance and the
shipped attribute classifier on real reference pictures, and `effgen eval` end to end."""

import json

import numpy as np
import pytest
import torch

from effgen import metrics
from effgen.models import refdata
from effgen.models.classifier import HEADS, WEIGHTS_FILE, load_classifier, predict
from effgen.models.configs import get_spec
from effgen.models.denoiser import WEIGHTS_DIR

# diffusers' DPM scheduler (the untrained-model sampler) trips a numpy-2 deprecation warning.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

needs_classifier = pytest.mark.skipif(
    not WEIGHTS_FILE.is_file(),
    reason=f"{WEIGHTS_FILE.name} missing: run samples/train_classifier.py")


@pytest.fixture(scope="module")
def real_a():
    return refdata.make_dataset(200, "train", seed=11)


@pytest.fixture(scope="module")
def real_b():
    return refdata.make_dataset(200, "train", seed=12)


def noisy(images, sigma, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.round(images + rng.normal(0, sigma, images.shape)), 0, 255).astype(np.uint8)


# --- PSNR and SSIM -----------------------------------------------------------------------


def test_identical_images_give_infinite_psnr_and_ssim_one(real_a):
    images = real_a[0][:8]
    assert np.all(np.isinf(metrics.psnr(images, images)))
    np.testing.assert_allclose(metrics.ssim(images, images), 1.0, atol=1e-12)
    assert metrics.psnr(images[0], images[0]) == float("inf")  # one image: a float
    assert metrics.ssim(images[0], images[0]) == pytest.approx(1.0)


def test_psnr_of_a_one_level_offset_is_20_log10_255():
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    np.testing.assert_allclose(metrics.psnr(a, a + 1), 20 * np.log10(255), rtol=1e-12)


def test_noise_lowers_psnr_and_ssim_monotonically(real_a):
    images = real_a[0][:16]
    levels = [1, 3, 8, 20, 50]
    psnrs = [metrics.psnr(images, noisy(images, s)) for s in levels]
    ssims = [metrics.ssim(images, noisy(images, s)) for s in levels]
    for lower, higher in zip(levels, levels[1:]):
        i, j = levels.index(lower), levels.index(higher)
        assert np.all(psnrs[j] < psnrs[i]), (lower, higher)  # per image, not just on average
        assert np.all(ssims[j] < ssims[i]), (lower, higher)
    assert np.all(ssims[0] < 1.0) and np.all(ssims[-1] > -1.0)


def test_ssim_of_flat_images_is_the_luminance_term():
    # With no structure the variances vanish and SSIM is (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    b = np.full((1, 16, 16, 3), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 140 + c1) / (100 ** 2 + 140 ** 2 + c1)
    np.testing.assert_allclose(metrics.ssim(a, b), expected, rtol=1e-12)


def naive_ssim(a, b):
    """Wang et al.'s definition written out window by window (independent of the filtering
    in metrics.ssim): Gaussian-weighted statistics of every 11x11 window inside the image."""
    taps = np.arange(-5, 6)
    g = np.exp(-(taps[:, None] ** 2 + taps[None, :] ** 2) / (2 * 1.5 ** 2))
    w = g / g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)
    h, wd, ch = a.shape
    values = []
    for c in range(ch):
        for y in range(5, h - 5):
            for x in range(5, wd - 5):
                pa, pb = a[y - 5:y + 6, x - 5:x + 6, c], b[y - 5:y + 6, x - 5:x + 6, c]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2)
                              / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_windowed_definition(real_a):
    a = real_a[0][3, 4:22, 2:20]  # an 18x18 crop: 8x8 windows per channel
    b = noisy(a, 15, seed=3)
    assert metrics.ssim(a, b) == pytest.approx(naive_ssim(a, b), abs=1e-10)
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), abs=1e-12)  # symmetric


def test_ssim_matches_skimage_when_installed(real_a):
    skimage_metrics = pytest.importorskip("skimage.metrics")
    a = real_a[0][:4]
    b = noisy(a, 12)
    for x, y in zip(a, b):
        want = skimage_metrics.structural_similarity(
            x, y, channel_axis=-1, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=255)
        assert metrics.ssim(x, y) == pytest.approx(want, abs=1e-6)


def test_image_checks_are_one_line_errors():
    a = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(a, a[:1])
    with pytest.raises(ValueError, match="uint8"):
        metrics.ssim(a, a.astype(np.float32))


# --- Fréchet distance, classifier ----------------------------------------------------------


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    feats = np.random.default_rng(0).normal(size=(300, 8))
    shift = np.arange(8) / 4
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance(feats, feats + shift) == pytest.approx(shift @ shift, rel=1e-6)


def untrained_dit_images(n: int) -> np.ndarray:
    """Pictures of the dit-ref architecture with random weights: what 'learned nothing'
    looks like to the metrics."""
    from effgen.models.denoiser import build_denoiser
    from effgen.models.sampling import sample, to_uint8

    spec = get_spec("dit-ref")
    denoiser = build_denoiser(spec, seed=0)
    noise = np.random.default_rng(0).standard_normal((n, 3, 32, 32), dtype=np.float32)
    labels = torch.arange(n) % refdata.NUM_CLASSES
    x = sample(denoiser, noise, labels, torch.full((n,), spec.num_classes), spec.scheduler,
               steps=3, guidance=spec.guidance)
    return to_uint8(x.numpy())


@needs_classifier
def test_frechet_distance_separates_real_from_untrained(real_a, real_b):
    from effgen.models.classifier import features

    real, real_other = features(real_a[0]), features(real_b[0])
    fd_real = metrics.frechet_distance(real, real_other)
    fd_untrained = metrics.frechet_distance(real, features(untrained_dit_images(100)))
    print(f"FD(real, real') = {fd_real:.3f}, FD(real, untrained dit-ref) = {fd_untrained:.3f}")
    assert fd_real * 5 < fd_untrained


@needs_classifier
def test_classifier_reads_fresh_real_pictures():
    seen, seen_attrs = refdata.make_dataset(240, "train", seed=4242)
    held, held_attrs = refdata.make_dataset(60, "heldout", seed=4242)
    images, attrs = np.concatenate([seen, held]), seen_attrs + held_attrs
    predicted, wanted = predict(images), refdata.labels_of(attrs)
    accuracy = {k: float((predicted[k] == wanted[k]).mean()) for k in HEADS}
    assert min(accuracy.values()) >= 0.95, accuracy
    assert metrics.attribute_accuracy(images, attrs) >= 0.95
    assert metrics.class_accuracy(images, [a.class_id for a in attrs]) >= 0.95


@needs_classifier
def test_evaluate_reports_every_key_and_writes_strict_json(real_a):
    images, attrs = real_a[0][:20], real_a[1][:20]
    result = metrics.evaluate(images, reference_images=images, attrs=attrs,
                              class_ids=[a.class_id for a in attrs], real_images=real_a[0][20:60])
    assert result["psnr"] == float("inf") and result["ssim"] == pytest.approx(1.0)
    assert result["n_images"] == 20 and result["fd"] >= 0
    assert metrics.evaluate(images)["fd"] is None
    text = metrics.to_json(result)
    assert json.loads(text)["psnr"] == "inf"
    assert "NaN" not in text and "Infinity" not in text


def test_missing_classifier_weights_name_the_training_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classifier.py"):
        load_classifier(tmp_path / "attr-classifier.safetensors")


# --- effgen eval -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit_bundle(tmp_path_factory):
    weights = WEIGHTS_DIR / "dit-ref.safetensors"
    if not weights.is_file():
        pytest.skip(f"{weights} missing (shipped dit-ref weights come from "
                    "samples/train_reference.py dit-ref); effgen eval needs a trained bundle")
    if not WEIGHTS_FILE.is_file():
        pytest.skip(f"{WEIGHTS_FILE.name} missing: run samples/train_classifier.py")
    from effgen.exporter.export import export_bundle

    return export_bundle("dit-ref", tmp_path_factory.mktemp("eval") / "dit-ref",
                         log=lambda msg: None)


def test_eval_of_a_bundle_against_itself(dit_bundle, tmp_path, capsys):
    from effgen.cli import main

    out = tmp_path / "eval.json"
    rc = main(["eval", str(dit_bundle), "--reference", str(dit_bundle), "--json", str(out),
               "--n-images", "4", "--steps", "2", "--guidance", "1.5", "--threads", "1"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["guidance"] == 1.5  # the guidance asked for, not the bundle's, is used
    assert result["psnr"] == "inf"
    assert result["ssim"] == pytest.approx(1.0)
    assert result["attr_acc"] is None  # class-conditional: no prompt to match positions with
    assert 0.0 <= result["class_acc"] <= 1.0
    by = result["acc_by_attribute"]  # a class is a shape and a colour: both must be right
    assert set(by) == {"shape", "colour"} and result["class_acc"] <= min(by.values())
    assert result["fd"] >= 0 and result["n_images"] == 4 and result["steps"] == 2
    assert "PSNR" in capsys.readouterr().out


def test_eval_of_a_directory_that_is_no_bundle_exits_2(tmp_path, capsys):
    from effgen.cli import main

    assert main(["eval", str(tmp_path), "--n-images", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json" in err


def test_accuracy_by_attribute_names_what_a_picture_gets_wrong():
    """Real pictures read right in every attribute; asking for other colours (same pictures)
    costs exactly colour, and the joint accuracy with it."""
    import dataclasses

    from effgen.metrics import evaluate
    from effgen.models import refdata

    images, attrs = refdata.make_dataset(24, "heldout", seed=5)
    right = evaluate(images, attrs=attrs)
    assert right["attr_acc"] >= 0.95 and min(right["acc_by_attribute"].values()) >= 0.95
    colours = list(refdata.COLOURS)
    recoloured = [dataclasses.replace(a, colour=colours[(colours.index(a.colour) + 1) % len(colours)])
                  for a in attrs]
    wrong = evaluate(images, attrs=recoloured)
    assert wrong["acc_by_attribute"]["colour"] == 0.0 and wrong["attr_acc"] == 0.0
    assert wrong["acc_by_attribute"]["shape"] == right["acc_by_attribute"]["shape"]
    # shape asked x shape read: the diagonal holds the images read right, rows the asked counts
    confusion = np.array(right["shape_confusion"])
    asked = refdata.labels_of(attrs)["shape"]
    assert confusion.sum() == 24 and np.trace(confusion) / 24 == right["acc_by_attribute"]["shape"]
    assert confusion.sum(axis=1).tolist() == np.bincount(asked, minlength=len(refdata.SHAPES)).tolist()
    squares = refdata.SHAPES.index("square")
    as_circles = [dataclasses.replace(a, shape="circle") if a.shape == "square" else a for a in attrs]
    moved = np.array(evaluate(images, attrs=as_circles)["shape_confusion"])
    circles = refdata.SHAPES.index("circle")
    assert moved[circles, squares] == confusion[squares, squares]  # asked circle, read square


@needs_classifier
def test_heldout_accuracy_scores_only_the_unseen_combinations():
    """attr_acc_heldout counts the images whose prompt asks for a combination training never
    showed: asking other colours of the seen pictures costs attr_acc, not it."""
    import dataclasses

    from effgen.metrics import evaluate

    seen, seen_attrs = refdata.make_dataset(16, "train", seed=6)
    held, held_attrs = refdata.make_dataset(16, "heldout", seed=6)
    assert not any(map(refdata.is_heldout, seen_attrs)) and all(map(refdata.is_heldout, held_attrs))
    colours = list(refdata.COLOURS)
    # a recoloured seen prompt may itself be a held-out combination: keep only those that stay seen
    recoloured = [dataclasses.replace(a, colour=colours[(colours.index(a.colour) + 1) % len(colours)])
                  for a in seen_attrs]
    keep = [i for i, a in enumerate(recoloured) if not refdata.is_heldout(a)]
    assert len(keep) >= 8
    images = np.concatenate([seen[keep], held])
    r = evaluate(images, attrs=[recoloured[i] for i in keep] + held_attrs)
    assert r["attr_acc_heldout"] >= 0.9
    assert r["attr_acc"] == pytest.approx(r["attr_acc_heldout"] * 16 / len(images))
    assert evaluate(seen, attrs=seen_attrs)["attr_acc_heldout"] is None
    assert evaluate(seen, class_ids=[a.class_id for a in seen_attrs])["attr_acc_heldout"] is None


@needs_classifier
def test_accuracy_flips_against_the_reference_pair_images():
    """acc_lost / acc_gained count images, paired with the reference's: pictures of other
    prompts in place of six right ones lose about six and gain none, and the accuracy
    difference is exactly (gained - lost) / n."""
    from effgen.metrics import evaluate
    from effgen.models import refdata

    images, attrs = refdata.make_dataset(24, "heldout", seed=5)
    same = evaluate(images, reference_images=images, attrs=attrs)
    assert (same["acc_lost"], same["acc_gained"]) == (0, 0)
    swapped = images.copy()
    swapped[:6] = images[12:18]
    r = evaluate(swapped, reference_images=images, attrs=attrs)
    assert r["acc_lost"] >= 5 and r["acc_gained"] == 0
    assert r["attr_acc"] - same["attr_acc"] == pytest.approx((r["acc_gained"] - r["acc_lost"]) / 24)
    ids = [a.class_id for a in attrs]
    c, c_same = (evaluate(x, reference_images=images, class_ids=ids) for x in (swapped, images))
    assert c["acc_lost"] >= 4
    assert c["class_acc"] - c_same["class_acc"] == pytest.approx((c["acc_gained"] - c["acc_lost"]) / 24)
    assert evaluate(swapped, attrs=attrs)["acc_lost"] is None  # no reference, no pairing


@needs_classifier
def test_guidance_sweep_scores_each_setting_and_marks_the_default(tmp_path, capsys, sample_script):
    """samples/guidance_sweep.py, as the README runs it: one exported bundle, one row per
    guidance interval and guidance with the spec's default marked, JSON written."""
    module = sample_script("guidance_sweep")
    spec = get_spec("dit-ref")
    default = spec.guidance
    own = "all" if spec.guidance_interval is None else "{:g}-{:g}".format(*spec.guidance_interval)
    other = "0-300" if own == "all" else "all"
    out = tmp_path / "sweep.json"
    assert module.main(["--json", str(out), "--models", "dit-ref", "--guidance", "1", str(default),
                        "--intervals", own, other, "--n-images", "2", "--threads", "1"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["guidance"], r["default"]) for r in rows] == [
        (1.0, False), (default, True), (1.0, False), (default, False)]
    assert all(r["n_images"] == 2 and r["fd"] >= 0 and 0 <= r["class_acc"] <= 1 for r in rows)
    assert f"| dit-ref | {default:g} (default) | {own} |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.main(["--json", str(out), "--intervals", "500"])
