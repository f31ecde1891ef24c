"""The synthetic world the bundled demo model draws, and the image analysis that grades it.

One uniform background colour, one filled axis-aligned object (circle, square or an
isosceles triangle pointing up) with a side or diameter of 30-50% of the image, placed
at a named position or anywhere. Rendering and grading live together so the training
data and the evaluation can never disagree about the world.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Object centre as a fraction of width and height.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
}
POSITION_JITTER = 0.03
VOCABULARY = sorted(
    {"a", "on", "in", "the", "background"}
    | set(COLORS)
    | set(SHAPES)
    | {w for p in POSITIONS for w in p.split()}
)


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str
    position: str | None  # None: the prompt names no position and the object may be anywhere

    @property
    def prompt(self) -> str:
        where = f" in the {self.position}" if self.position else ""
        return f"a {self.color} {self.shape}{where} on a {self.background} background"


def random_scene(rng: random.Random, position_prob: float = 0.5) -> Scene:
    color, background = rng.sample(sorted(COLORS), 2)
    position = rng.choice(sorted(POSITIONS)) if rng.random() < position_prob else None
    return Scene(color, rng.choice(SHAPES), background, position)


def snap_to_grid(extent: float, cx: float, cy: float, size: int, grid: int) -> tuple[float, float, float]:
    """The object's box moved to whole ``grid``-pixel cells: side a multiple of ``grid`` pixels
    kept within 30-50% of the image, corner on a multiple of ``grid``, inside the image."""
    cells = size // grid
    lo, hi = math.ceil(0.30 * size / grid), math.floor(0.50 * size / grid)
    if lo > hi:
        raise ValueError(f"grid: {grid} px cells leave no side of 30-50% of a {size} px image")
    side = min(max(round(extent * size / grid), lo), hi)
    left = min(max(round(cx * cells - side / 2), 0), cells - side)
    top = min(max(round(cy * cells - side / 2), 0), cells - side)
    return side / cells, (left + side / 2) / cells, (top + side / 2) / cells


def object_box(scene: Scene, rng: random.Random, size: int = 256, grid: int = 0) -> tuple[float, float, float]:
    """Where ``scene``'s object goes: its side or diameter and centre, as fractions of the image.

    Drawn from ``rng`` (extent, then centre: anywhere that keeps it inside, or the named
    position with a little jitter); with ``grid`` > 0, moved onto whole ``grid``-pixel cells."""
    extent = rng.uniform(0.30, 0.50)  # side or diameter, as a fraction of the image
    half = extent / 2
    if scene.position is None:
        cx, cy = rng.uniform(half, 1 - half), rng.uniform(half, 1 - half)
    else:
        px, py = POSITIONS[scene.position]
        cx = px + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        cy = py + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    if grid:
        extent, cx, cy = snap_to_grid(extent, cx, cy, size, grid)
    return extent, cx, cy


def render(scene: Scene, size: int, rng: random.Random, supersample: int = 2, grid: int = 0) -> np.ndarray:
    """Draw ``scene`` as a ``size`` x ``size`` uint8 RGB array (anti-aliased by supersampling).

    ``grid`` > 0 puts the object's bounding box on whole ``grid``-pixel cells (the same random
    draws, then rounded): with ``grid`` 8, the autoencoder's latent cells, a square's edges fall
    between latent pixels instead of across them."""
    return render_box(scene, size, *object_box(scene, rng, size, grid), supersample=supersample)


def render_box(scene: Scene, size: int, extent: float, cx: float, cy: float, supersample: int = 2,
               exponent: float | None = None, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """``scene`` with its object in the given box (side or diameter ``extent``, centre ``cx``,
    ``cy``, fractions of the image).

    With ``exponent`` n the object is instead the superellipse ``|dx|^n + |dy|^n <= r^n`` in the
    same box, whatever the scene's shape: n = 2 is the disc, large n tends to the square, and the
    values between are the rounded squares and bulging discs a half-trained model draws.

    ``window`` (top, left, height, width), in output pixels, draws only that part of the image:
    the same pixels as cropping the full image, without drawing the rest (the VAE stage trains
    on 96 px crops of 256 px images)."""
    top_px, left_px, rows, cols = window if window is not None else (0, 0, size, size)
    if not (0 <= top_px and 0 <= left_px and rows > 0 and cols > 0 and top_px + rows <= size
            and left_px + cols <= size):
        raise ValueError(f"window: {window} is not inside a {size} x {size} image")
    half = extent / 2
    n = size * supersample
    x = ((np.arange(left_px * supersample, (left_px + cols) * supersample, dtype=np.float32) + 0.5) / n)[None, :]
    y = ((np.arange(top_px * supersample, (top_px + rows) * supersample, dtype=np.float32) + 0.5) / n)[:, None]
    if exponent is not None:
        if not exponent > 0:
            raise ValueError(f"exponent: a superellipse needs a positive exponent, got {exponent}")
        with np.errstate(over="ignore"):  # far outside the box the powers overflow to inf: outside
            mask = (np.abs(x - cx) / half) ** exponent + (np.abs(y - cy) / half) ** exponent <= 1
    elif scene.shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif scene.shape == "square":
        mask = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # triangle: apex at the top centre, base at the bottom
        top = cy - half
        depth = (y - top) / extent  # 0 at the apex, 1 at the base
        mask = (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= depth * half)
    fg = np.array(COLORS[scene.color], np.float32)
    bg = np.array(COLORS[scene.background], np.float32)
    # Each output pixel is the mean of its supersample**2 subpixels, each fg or bg: bg plus the
    # covered count times (fg - bg), over the count. With whole-number colours every step is
    # exact in float32, so this is bit for bit the mean of the blended subpixels, at a fraction
    # of the memory traffic.
    covered = mask.reshape(rows, supersample, cols, supersample).sum(axis=(1, 3), dtype=np.float32)
    img = bg + covered[..., None] * (fg - bg) / np.float32(supersample * supersample)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def nearest_color(rgb: np.ndarray) -> str:
    names = list(COLORS)
    dists = [float(np.sum((np.asarray(COLORS[n], np.float32) - rgb) ** 2)) for n in names]
    return names[int(np.argmin(dists))]


@dataclass(frozen=True)
class Analysis:
    background: str
    color: str | None
    shape: str | None
    position: str | None
    fill_ratio: float


def analyze(image: np.ndarray) -> Analysis:
    """Read background colour, object colour, shape and position off an RGB image."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    h, w = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb)
    diff = np.sqrt(((img - np.asarray(COLORS[background], np.float32)) ** 2).sum(-1))
    mask = diff > 35.0
    if mask.sum() < 0.01 * h * w:
        return Analysis(background, None, None, None, 0.0)
    color = nearest_color(np.median(img[mask], axis=0))
    # For the geometry keep the pixels nearer the object's colour than the background's
    # (yellow and orange are only ~70 apart, so a fixed radius would not separate them).
    obj = np.sqrt(((img - np.asarray(COLORS[color], np.float32)) ** 2).sum(-1)) < diff
    if obj.sum() < 0.01 * h * w:
        obj = mask
    # Bounding box over rows/columns holding at least 2 object pixels (ignores lone specks).
    rows, cols = np.nonzero(obj.sum(1) >= 2)[0], np.nonzero(obj.sum(0) >= 2)[0]
    if len(rows) == 0 or len(cols) == 0:
        return Analysis(background, color, None, None, 0.0)
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    box_area = max((y1 - y0 + 1) * (x1 - x0 + 1), 1.0)
    fill = float(obj.sum() / box_area)
    # Filled fraction of the bounding box: square 1.0, circle pi/4, triangle 0.5.
    if fill > 0.89:
        shape = "square"
    elif fill > 0.64:
        shape = "circle"
    else:
        shape = "triangle"
    cx = (x0 + x1) / 2 / w
    cy = (y0 + y1) / 2 / h
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return Analysis(background, color, shape, position, fill)


def eval_prompts(n: int, seed: int = 0) -> list[Scene]:
    """``n`` scenes cycling through the shapes, half of them with a named position."""
    rng = random.Random(seed)
    scenes = []
    positions = sorted(POSITIONS)
    for i in range(n):
        color, background = rng.sample(sorted(COLORS), 2)
        position = positions[(i // 2) % len(positions)] if i % 2 == 0 else None
        scenes.append(Scene(color, SHAPES[i % len(SHAPES)], background, position))
    return scenes


ATTRIBUTES = ("color", "background", "shape", "position")


def grade(scene: Scene, image) -> dict:
    """One generated image against its prompt's scene: a hit per attribute (position None when
    the prompt names none) and what the analysis read."""
    got = analyze(np.asarray(image.convert("RGB")))
    return {
        "prompt": scene.prompt,
        "color": got.color == scene.color,
        "background": got.background == scene.background,
        "shape": got.shape == scene.shape,
        "position": (got.position == scene.position) if scene.position else None,
        "read": {"color": got.color, "background": got.background, "shape": got.shape,
                 "position": got.position, "fill": round(got.fill_ratio, 3)},
    }


def accuracy(rows: list[dict]) -> dict:
    """Share of hits per attribute over the rows that grade it."""
    result = {}
    for attr in ATTRIBUTES:
        graded = [r[attr] for r in rows if r[attr] is not None]
        result[attr] = sum(graded) / len(graded) if graded else float("nan")
    return result
