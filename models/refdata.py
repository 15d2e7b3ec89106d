"""The reference data set: captioned pictures of one shape, drawn procedurally.

No pretrained diffusion weights can be fetched where effgen is developed, and quantization
can only be judged on a model that has learned something. So the reference models are trained
on pictures this module draws: one shape (circle, square, triangle, star) in one of five
colours and two sizes, in one cell of a 3x3 grid, on one of three backgrounds. Every picture
has a caption ("a small red triangle at the top left on a grey background") and its attribute
labels, so generated images can be scored for whether they show what the prompt asked for.

Everything is seeded: the same (seed, index) always gives the same picture. numpy only.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 215),
    "yellow": (235, 205, 35),
    "purple": (145, 55, 185),
}
SIZES = {"small": 7.0, "large": 11.0}  # shape diameter in pixels at 32x32
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
BACKGROUNDS = {"grey": (128, 128, 128), "black": (25, 25, 25), "white": (240, 240, 240)}

RESOLUTION = 32
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges
_CELL_CENTRES = (6.0, 16.0, 26.0)  # pixel centres of the grid rows/columns at 32x32
_JITTER = 1.5  # pixels; keeps the model from memorising 9 exact positions

NUM_CLASSES = len(SHAPES) * len(COLOURS)  # class-conditional models: shape x colour


@dataclasses.dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    size: str
    row: str
    col: str
    background: str

    @property
    def caption(self) -> str:
        return (f"a {self.size} {self.colour} {self.shape} at the {self.row} {self.col} "
                f"on a {self.background} background")

    @property
    def class_id(self) -> int:
        return class_id(self.shape, self.colour)

    def labels(self) -> dict[str, int]:
        """Integer labels as the attribute classifier predicts them."""
        return {
            "shape": SHAPES.index(self.shape),
            "colour": list(COLOURS).index(self.colour),
            "size": list(SIZES).index(self.size),
            "position": ROWS.index(self.row) * 3 + COLS.index(self.col),
            "background": list(BACKGROUNDS).index(self.background),
        }


def class_id(shape: str, colour: str) -> int:
    return SHAPES.index(shape) * len(COLOURS) + list(COLOURS).index(colour)


def class_name(class_id_: int) -> str:
    shape, colour = divmod(int(class_id_), len(COLOURS))
    return f"{list(COLOURS)[colour]} {SHAPES[shape]}"


def all_combinations() -> list[Attributes]:
    return [Attributes(*c) for c in itertools.product(
        SHAPES, COLOURS, SIZES, ROWS, COLS, BACKGROUNDS)]


@functools.lru_cache
def heldout_triples(seed: int = 0, fraction: float = 0.1) -> frozenset[tuple[str, str, str]]:
    """(shape, colour, row+col) triples never shown in training (computed once per seed).

    Holding out whole shape/colour/position triples (in every size and background) makes the
    held-out captions ask for combinations the model has never seen together.
    """
    triples = sorted(itertools.product(SHAPES, COLOURS, [f"{r} {c}" for r in ROWS for c in COLS]))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(triples), size=int(round(fraction * len(triples))), replace=False)
    return frozenset(triples[i] for i in sorted(picked))


def _triple(a: Attributes) -> tuple[str, str, str]:
    return (a.shape, a.colour, f"{a.row} {a.col}")


def is_heldout(a: Attributes, seed: int = 0) -> bool:
    """Does `a` ask for a shape/colour/position combination that training never shows?"""
    return _triple(a) in heldout_triples(seed)


def split(name: str, seed: int = 0) -> list[Attributes]:
    """Attribute combinations of a split: "train" excludes the held-out triples, "heldout" is
    exactly them."""
    held = heldout_triples(seed)
    combos = all_combinations()
    if name == "train":
        return [a for a in combos if _triple(a) not in held]
    if name == "heldout":
        return [a for a in combos if _triple(a) in held]
    raise ValueError(f"unknown split {name!r}; choose train or heldout")


def eval_prompts(n: int, seed: int = 1234) -> list[Attributes]:
    """A fixed evaluation set: half held-out combinations, half seen ones, in a seeded order."""
    rng = np.random.default_rng(seed)
    held, seen = split("heldout"), split("train")
    n_held = n // 2
    picks = [held[i] for i in rng.choice(len(held), n_held, replace=n_held > len(held))]
    picks += [seen[i] for i in rng.choice(len(seen), n - n_held, replace=False)]
    return picks


# --- drawing -----------------------------------------------------------------------------


def _polygon_mask(xs: np.ndarray, ys: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the pixel grid (works for the star)."""
    inside = np.zeros(xs.shape, dtype=bool)
    vx, vy = vertices[:, 0], vertices[:, 1]
    for i in range(len(vertices)):
        x0, y0, x1, y1 = vx[i - 1], vy[i - 1], vx[i], vy[i]
        crosses = (y0 > ys) != (y1 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at)
    return inside


def _shape_mask(shape: str, cx: float, cy: float, diameter: float, res: int) -> np.ndarray:
    """Coverage (0..1) of one shape on a res x res canvas, anti-aliased by supersampling."""
    n = res * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    xs, ys = np.meshgrid(coords, coords)
    r = diameter / 2
    if shape == "circle":
        hit = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    elif shape == "square":
        half = r * 0.85  # a square of the same diameter looks larger than a circle
        hit = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    elif shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        verts = np.stack([cx + r * np.cos(angles), cy + r * 1.1 * np.sin(angles) + r * 0.15], 1)
        hit = _polygon_mask(xs, ys, verts)
    elif shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, r * 1.15, r * 0.5)
        verts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        hit = _polygon_mask(xs, ys, verts)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return hit.reshape(res, _SUPERSAMPLE, res, _SUPERSAMPLE).mean(axis=(1, 3))


def render(a: Attributes, rng: np.random.Generator, res: int = RESOLUTION) -> np.ndarray:
    """One picture as uint8 (res, res, 3). `rng` draws the position jitter and the small
    brightness variation of background and shape."""
    scale = res / RESOLUTION
    jitter = rng.uniform(-_JITTER, _JITTER, size=2) * scale
    cx = _CELL_CENTRES[COLS.index(a.col)] * scale + jitter[0]
    cy = _CELL_CENTRES[ROWS.index(a.row)] * scale + jitter[1]
    cover = _shape_mask(a.shape, cx, cy, SIZES[a.size] * scale, res)[..., None]
    bg = np.asarray(BACKGROUNDS[a.background], np.float32) + rng.uniform(-12, 12)
    fg = np.asarray(COLOURS[a.colour], np.float32) * rng.uniform(0.9, 1.1)
    img = bg * (1 - cover) + fg * cover
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_dataset(n: int, split_name: str = "train", seed: int = 0,
                 res: int = RESOLUTION) -> tuple[np.ndarray, list[Attributes]]:
    """`n` pictures with their attributes; deterministic in (n, split, seed, res)."""
    combos = split(split_name)
    rng = np.random.default_rng([seed, 0 if split_name == "train" else 1])
    picks = rng.integers(0, len(combos), size=n)
    attrs = [combos[i] for i in picks]
    images = np.stack([render(a, rng, res) for a in attrs])
    return images, attrs


def labels_of(attrs: list[Attributes]) -> dict[str, np.ndarray]:
    keys = ("shape", "colour", "size", "position", "background")
    rows = [a.labels() for a in attrs]
    return {k: np.array([r[k] for r in rows], dtype=np.int64) for k in keys}
