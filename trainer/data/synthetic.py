"""SyntheticScenes: procedural instance-segmentation scenes, the project's built-in dataset.

Every sample is drawn from a numpy Generator seeded from (seed, index) alone, so any sample can be
regenerated on its own, in any order, in any process; the scenes are computed in numpy (torch comes
in only through `trainer.boxes`, whose `mask_boxes` gives the instances' boxes).

What makes the scenes hard, and why (the paper's instance CRF exists for these cases):
- **Same-class occlusion.** About a third of the instances after the first are placed deliberately on
  top of an existing instance of the same class, usually with the same colour and texture. The
  semantic map cannot separate them; only the detections can (docs/algorithm.md §1, §5).
- **Shape and appearance both matter.** Each class has a typical outline (disc, square, triangle,
  star, ...) with per-instance aspect, rotation and irregularity, and two colour modes and two
  texture families. Colour alone narrows a pixel down to two classes, texture alone to two others;
  only together (or with the outline, which occlusion often hides) do they identify the class.
- **Clutter.** Background gradients and noise, distractor blobs, irregular polygons and strokes, some
  in the classes' own saturated colours (hard negatives), and occasionally a thin wire drawn over the
  objects, which cuts instances into pieces.
- **Scale and truncation.** Radii vary over about 3x (log-uniform), objects may be cut by the image
  border (at most half of one lies outside), and each visible instance keeps at least 30 % of its
  in-image area and a minimum pixel count, so every labelled instance is recognisable (at small image
  sizes the void band can still cover a small one wholly: 5 of 1424 instances at 32x32).
- **Camera effects.** A light blur (objects' edges are not crisp) and per-image Gaussian pixel noise.

Labels follow PASCAL VOC: 0 = background, 1..K = classes, 255 = void on a thin band around every
object edge (both sides of each instance/instance and instance/background boundary), optional.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from dynseg.sdk.commands.defaults import MAX_IMAGES, MIN_IMAGE_SIDE
from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.checks import int_in, is_int

from ..boxes import mask_boxes

__all__ = ["SyntheticScenes", "SceneSample", "VOID"]

VOID = 255
"""Label of void pixels in `semantic` and `instances` (ignored by losses and metrics)."""

# Hues in degrees of the colour modes the classes draw from.
_HUES = {"red": 0.0, "orange": 28.0, "yellow": 55.0, "green": 125.0, "cyan": 185.0, "blue": 225.0, "purple": 285.0}

# (name, two colour modes, two texture families) per class, in label order 1..K. With the default four
# classes colour modes are shared around a ring (disc/square share blue, square/triangle green, ...) and
# texture families across it (disc/triangle, square/star), so (colour, texture) identifies the class
# while either alone leaves two candidates.
_CLASS_STYLES = (
    ("disc", ("red", "blue"), ("stripes", "noise")),
    ("square", ("blue", "green"), ("checker", "spots")),
    ("triangle", ("green", "yellow"), ("stripes", "noise")),
    ("star", ("yellow", "red"), ("checker", "spots")),
    ("cross", ("purple", "cyan"), ("stripes", "spots")),
    ("ring", ("cyan", "orange"), ("noise", "checker")),
)

MAX_CLASSES = len(_CLASS_STYLES)

_SAME_CLASS_OCCLUSION = 0.35  # chance that an instance (after the first) is placed over one of its own class
_SAME_LOOK = 0.7  # chance that such an occluder also copies the colour mode and texture of the occluded one
_MIN_VISIBLE_FRACTION = 0.3  # of an instance's in-image area that must stay visible
_MIN_IN_IMAGE_FRACTION = 0.5  # of an instance's full area that must lie inside the image
_PLACEMENT_TRIES = 20
_WIRE_PROBABILITY = 0.25


class SceneSample(TypedDict):
    """One scene. H, W = image_size; M = number of visible instances (>= 1)."""

    image: np.ndarray  # uint8 (H, W, 3) RGB
    semantic: np.ndarray  # int64 (H, W): 0 background, 1..K class, 255 void
    instances: np.ndarray  # int32 (H, W): 0 background, 1..M instance id, 255 void (exactly where semantic is)
    masks: np.ndarray  # bool (M, H, W): each instance's exact visible pixels, void band included
    labels: np.ndarray  # int64 (M,) in 1..K
    boxes: np.ndarray  # float32 (M, 4) xyxy, inclusive pixel coordinates of masks[m]


@dataclass(frozen=True)
class _Geometry:
    """An instance's outline: centre (pixels), radius (pixels), rotation (radians), aspect (>0) and
    class-specific parameters drawn once (star points, inner radius, triangle vertex angles ...)."""

    cy: float
    cx: float
    radius: float
    angle: float
    aspect: float
    params: tuple[float, ...]


@dataclass(frozen=True)
class _Look:
    colour: np.ndarray  # float (3,) RGB in 0..255
    colour_mode: int
    texture: str
    texture_params: tuple[float, ...]


class SyntheticScenes:
    """Procedural scenes of K shape classes with same-class occlusion, clutter and void borders.

    A map-style dataset (`len`, integer indexing) usable by `torch.utils.data.DataLoader`; it returns
    numpy arrays (see `SceneSample`). Instance counts differ per image, so batches larger than one
    need a custom `collate_fn`.

    Args (keyword-only):
        size: number of images.
        image_size: (H, W) in pixels, each at least MIN_IMAGE_SIDE (32).
        num_classes: K, 1..6; classes are `class_names[1:]`.
        max_instances: N, 1..253; each image has 1..N visible instances (fewer than drawn when a
            placement keeps failing the visibility rules).
        seed: sample i depends only on (seed, i).
        void_border: mark a band two pixels wide on every object edge as void (255).
    """

    def __init__(
        self,
        *,
        size: int = 256,
        image_size: tuple[int, int] = (128, 160),
        num_classes: int = 4,
        max_instances: int = 6,
        seed: int = 0,
        void_border: bool = True,
    ):
        self.size = int_in("size", size, 0, MAX_IMAGES)
        if len(tuple(image_size)) != 2 or any(not is_int(s) or s < MIN_IMAGE_SIDE for s in image_size):
            raise InvalidArgumentError(f"image_size must be (H, W) ints, each >= {MIN_IMAGE_SIDE}, got {image_size!r}")
        self.num_classes = int_in("num_classes", num_classes, 1, MAX_CLASSES)
        self.max_instances = int_in("max_instances", max_instances, 1, VOID - 2)
        self.seed = int_in("seed", seed, 0)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.void_border = bool(void_border)
        self.class_names: tuple[str, ...] = ("background",) + tuple(s[0] for s in _CLASS_STYLES[:num_classes])
        """Indexed by label: class_names[0] == "background", class_names[1..K] the object classes."""

    def __len__(self) -> int:
        return self.size

    def image_shape(self, index: int) -> tuple[int, int]:
        from .common import check_index  # common imports this module

        check_index(index, self.size)
        return self.image_size

    def __getitem__(self, index: int) -> SceneSample:
        from .common import check_index  # common imports this module

        index = check_index(index, self.size)
        return _render_scene(
            np.random.default_rng([self.seed, index]),
            self.image_size,
            self.num_classes,
            self.max_instances,
            self.void_border,
        )

    def __repr__(self) -> str:
        return (
            f"SyntheticScenes(size={self.size}, image_size={self.image_size}, num_classes={self.num_classes}, "
            f"max_instances={self.max_instances}, seed={self.seed}, void_border={self.void_border})"
        )


# --------------------------------------------------------------------------------------------- scene


def _render_scene(
    rng: np.random.Generator, image_size: tuple[int, int], num_classes: int, max_instances: int, void_border: bool
) -> SceneSample:
    height, width = image_size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)  # pixel centres at integer coordinates
    canvas = _background(rng, ys, xs)  # (H, W, 3) float32
    _draw_clutter(rng, canvas, ys, xs, num_classes)

    short = min(height, width)
    min_area = max(12, int(0.0025 * height * width))
    owner = np.zeros((height, width), np.int32)  # 0 background, j = j-th placed instance (1-based)
    placed: list[tuple[int, _Geometry, _Look, int]] = []  # (class, geometry, look, in-image area)
    target = int(rng.integers(1, max_instances + 1))
    for _ in range(target):
        for _ in range(_PLACEMENT_TRIES):
            label, geometry, look = _propose(rng, placed, num_classes, short, height, width)
            mask, full_area = _shape_mask(label, geometry, ys, xs)
            area = int(mask.sum())
            if area < min_area or area < _MIN_IN_IMAGE_FRACTION * full_area:
                continue
            trial = np.where(mask, len(placed) + 1, owner)
            if not _all_visible(trial, [p[3] for p in placed] + [area], min_area):
                continue
            owner = trial
            _paint(canvas, mask, look, geometry, ys, xs)
            placed.append((label, geometry, look, area))
            break
        else:
            if not placed:  # never leave a scene empty: a mid-sized instance in the middle always fits
                label = int(rng.integers(1, num_classes + 1))
                geometry = _geometry(rng, label, (height - 1) / 2, (width - 1) / 2, 0.2 * short)
                look = _look(rng, label)
                mask, _ = _shape_mask(label, geometry, ys, xs)
                owner[mask] = 1
                _paint(canvas, mask, look, geometry, ys, xs)
                placed.append((label, geometry, look, int(mask.sum())))

    if rng.random() < _WIRE_PROBABILITY:
        wire, colour = _wire(rng, ys, xs)
        trial = np.where(wire, 0, owner)
        if _all_visible(trial, [p[3] for p in placed], min_area):
            owner = trial
            canvas[wire] = colour

    canvas = _blur(canvas)
    canvas += rng.normal(0.0, rng.uniform(2.0, 7.0), canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    count = len(placed)
    masks = owner[None] == np.arange(1, count + 1, dtype=np.int32)[:, None, None]  # (M, H, W)
    labels = np.array([p[0] for p in placed], np.int64)
    class_of = np.concatenate([[0], labels])  # owner -> class
    semantic = class_of[owner]
    instances = owner.copy()
    if void_border:
        void = _edge_band(owner)
        semantic[void] = VOID
        instances[void] = VOID
    return SceneSample(
        image=image,
        semantic=semantic.astype(np.int64),
        instances=instances.astype(np.int32),
        masks=masks,
        labels=labels,
        boxes=mask_boxes(masks),
    )


def _all_visible(owner: np.ndarray, areas: list[int], min_area: int) -> bool:
    """Whether every instance j (1-based) keeps >= min_area pixels and >= 30 % of its in-image area."""
    visible = np.bincount(owner.ravel(), minlength=len(areas) + 1)[1:]
    needed = np.maximum(min_area, _MIN_VISIBLE_FRACTION * np.asarray(areas, np.float64))
    return bool(np.all(visible >= needed))


def _propose(
    rng: np.random.Generator,
    placed: list[tuple[int, _Geometry, _Look, int]],
    num_classes: int,
    short: int,
    height: int,
    width: int,
) -> tuple[int, _Geometry, _Look]:
    """A candidate instance: either over an existing instance of the same class, or anywhere."""
    if placed and rng.random() < _SAME_CLASS_OCCLUSION:
        label, under, under_look, _ = placed[int(rng.integers(len(placed)))]
        radius = float(np.clip(under.radius * rng.uniform(0.75, 1.3), 0.06 * short, 0.26 * short))
        direction = rng.uniform(0, 2 * math.pi)
        distance = (under.radius + radius) * rng.uniform(0.4, 0.8)
        cy = under.cy + distance * math.sin(direction)
        cx = under.cx + distance * math.cos(direction)
        geometry = _geometry(rng, label, cy, cx, radius)
        if rng.random() < _SAME_LOOK:
            look = _look(rng, label, colour_mode=under_look.colour_mode, texture=under_look.texture)
        else:
            look = _look(rng, label)
        return label, geometry, look
    present = {p[0] for p in placed}
    weights = np.array([1.0 if c in present else 5.0 for c in range(1, num_classes + 1)])  # favour variety
    label = int(rng.choice(num_classes, p=weights / weights.sum())) + 1
    radius = short * math.exp(rng.uniform(math.log(0.075), math.log(0.23)))
    geometry = _geometry(rng, label, rng.uniform(0, height - 1), rng.uniform(0, width - 1), radius)
    return label, geometry, _look(rng, label)


# ------------------------------------------------------------------------------------------ outlines


def _geometry(rng: np.random.Generator, label: int, cy: float, cx: float, radius: float) -> _Geometry:
    name = _CLASS_STYLES[label - 1][0]
    aspect = math.exp(rng.uniform(-0.25, 0.25))  # about 0.78..1.28
    if name == "triangle":  # vertex angles jittered around an equilateral triangle
        params = tuple(float(a) for a in np.deg2rad([90, 210, 330] + rng.uniform(-12, 12, 3)))
    elif name == "star":  # points, inner radius ratio
        params = (float(rng.integers(5, 7)), float(rng.uniform(0.38, 0.55)))
    elif name == "cross":  # arm half-width
        params = (float(rng.uniform(0.26, 0.38)),)
    elif name == "ring":  # inner radius ratio
        params = (float(rng.uniform(0.4, 0.6)),)
    elif name == "square":  # corner rounding
        params = (float(rng.uniform(0.0, 0.25)),)
    else:
        params = ()
    return _Geometry(float(cy), float(cx), float(radius), float(rng.uniform(0, 2 * math.pi)), aspect, params)


def _local_coordinates(geometry: _Geometry, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotated, aspect-scaled coordinates (u, v), in units of the radius, of the pixels ys, xs."""
    dy, dx = ys - geometry.cy, xs - geometry.cx
    cos, sin = math.cos(geometry.angle), math.sin(geometry.angle)
    stretch = math.sqrt(geometry.aspect)
    u = (dx * cos + dy * sin) / (geometry.radius * stretch)
    v = (-dx * sin + dy * cos) / (geometry.radius / stretch)
    return u, v


def _window(geometry: _Geometry, height: int, width: int) -> tuple[slice, slice]:
    """The pixel rows and columns the outline can touch (clipped to the image; possibly empty)."""
    reach = geometry.radius * math.sqrt(max(geometry.aspect, 1 / geometry.aspect)) * 1.5 + 1
    y0, y1 = max(0, int(geometry.cy - reach)), min(height, int(geometry.cy + reach) + 2)
    x0, x1 = max(0, int(geometry.cx - reach)), min(width, int(geometry.cx + reach) + 2)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _inside(name: str, params: tuple[float, ...], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether (u, v) lies inside the unit-scale outline of a class."""
    if name == "disc":
        return u * u + v * v <= 1.0
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= params[0] ** 2)
    if name == "square":  # a rounded square of half-side 0.85
        rounding = params[0] * 0.85
        qu, qv = np.maximum(np.abs(u) - (0.85 - rounding), 0), np.maximum(np.abs(v) - (0.85 - rounding), 0)
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85) & (qu * qu + qv * qv <= rounding * rounding + 1e-12)
    if name == "cross":
        half = params[0]
        au, av = np.abs(u), np.abs(v)
        return ((au <= half) & (av <= 1.0)) | ((av <= half) & (au <= 1.0))
    if name == "triangle":
        angles = np.asarray(params)
        return _inside_polygon(u, v, np.cos(angles), np.sin(angles))
    if name == "star":
        points, inner = int(params[0]), params[1]
        angles = math.pi / 2 + np.arange(2 * points) * math.pi / points
        radii = np.where(np.arange(2 * points) % 2 == 0, 1.05, 1.05 * inner)
        return _inside_polygon(u, v, radii * np.cos(angles), radii * np.sin(angles))
    raise AssertionError(f"unknown outline {name!r}")  # unreachable: names come from _CLASS_STYLES


def _inside_polygon(u: np.ndarray, v: np.ndarray, pu: np.ndarray, pv: np.ndarray) -> np.ndarray:
    """Even-odd rule: whether points (u, v) lie inside the closed polygon with vertices (pu, pv)."""
    inside = np.zeros(u.shape, bool)
    for i in range(len(pu)):
        au, av, bu, bv = pu[i - 1], pv[i - 1], pu[i], pv[i]
        if av == bv:
            continue
        crosses = (av > v) != (bv > v)
        at = au + (v - av) * (bu - au) / (bv - av)  # u where the edge meets the horizontal through v
        inside ^= crosses & (u < at)
    return inside


def _shape_mask(label: int, geometry: _Geometry, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, int]:
    """bool (H, W) in-image pixels of the outline, and the outline's full area (counting outside the image)."""
    name, params = _CLASS_STYLES[label - 1][0], geometry.params
    height, width = ys.shape
    rows, cols = _window(geometry, height, width)
    mask = np.zeros((height, width), bool)
    u, v = _local_coordinates(geometry, ys[rows, cols], xs[rows, cols])
    mask[rows, cols] = _inside(name, params, u, v)
    # Full area from the same rasterisation on an unclipped grid around the centre.
    reach = int(geometry.radius * math.sqrt(max(geometry.aspect, 1 / geometry.aspect)) * 1.5) + 2
    gy, gx = np.mgrid[-reach : reach + 1, -reach : reach + 1].astype(np.float32)
    cy, cx = round(geometry.cy), round(geometry.cx)
    gu, gv = _local_coordinates(geometry, gy + cy, gx + cx)
    full = int(_inside(name, params, gu, gv).sum())
    return mask, max(full, 1)


# ---------------------------------------------------------------------------------------- appearance


def _hsv(hue_degrees: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue_degrees / 360.0) % 1.0, saturation, value), np.float32) * 255.0


def _look(rng: np.random.Generator, label: int, *, colour_mode: int = -1, texture: str = "") -> _Look:
    """The class's colour (one of two modes, jittered per instance) and texture (one of two families)."""
    _, modes, textures = _CLASS_STYLES[label - 1]
    mode = int(rng.integers(2)) if colour_mode < 0 else colour_mode
    hue = _HUES[modes[mode]] + rng.normal(0.0, 7.0)
    colour = _hsv(hue, rng.uniform(0.55, 0.95), rng.uniform(0.55, 0.95))
    texture = texture or textures[int(rng.integers(2))]
    # amplitude, scale (pixels), orientation, phase, shading strength, shading direction
    params = (
        float(rng.uniform(0.12, 0.28)),
        float(rng.uniform(3.0, 7.0)),
        float(rng.uniform(0, math.pi)),
        float(rng.uniform(0, 2 * math.pi)),
        float(rng.uniform(0.0, 0.18)),
        float(rng.uniform(0, 2 * math.pi)),
        float(rng.integers(1 << 31)),
    )
    return _Look(colour, mode, texture, params)


def _texture(look: _Look, py: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Multiplicative brightness pattern around 1 on object-attached pixel coordinates (py, px)."""
    amplitude, scale, orientation, phase, _, _, noise_seed = look.texture_params
    if look.texture == "stripes":
        t = px * math.cos(orientation) + py * math.sin(orientation)
        pattern = np.sin(2 * math.pi * t / (scale * 1.3) + phase)
    elif look.texture == "checker":
        pattern = np.where((np.floor(px / scale) + np.floor(py / scale)) % 2 == 0, 1.0, -1.0)
    elif look.texture == "spots":
        cell = scale * 1.6
        fy, fx = py / cell - np.floor(py / cell) - 0.5, px / cell - np.floor(px / cell) - 0.5
        pattern = np.where(fy * fy + fx * fx < 0.09, 1.0, -0.35)
    else:  # "noise": blocky random field, smoothed by the final blur
        noise = np.random.default_rng(int(noise_seed)).normal(0, 1, (64, 64))
        iy = np.floor(py / (scale * 0.6)).astype(np.int64) % 64
        ix = np.floor(px / (scale * 0.6)).astype(np.int64) % 64
        pattern = np.clip(noise[iy, ix] / 1.5, -1, 1)
    return 1.0 + amplitude * pattern


def _paint(
    canvas: np.ndarray, mask: np.ndarray, look: _Look, geometry: _Geometry, ys: np.ndarray, xs: np.ndarray
) -> None:
    """Fill the object's pixels with its colour, texture (attached to the object) and a linear shading."""
    dy, dx = ys[mask] - geometry.cy, xs[mask] - geometry.cx
    cos, sin = math.cos(geometry.angle), math.sin(geometry.angle)
    pu, pv = dx * cos + dy * sin, -dx * sin + dy * cos
    shade_strength, shade_direction = look.texture_params[4], look.texture_params[5]
    shading = 1.0 + shade_strength * (pu * math.cos(shade_direction) + pv * math.sin(shade_direction)) / geometry.radius
    factor = (_texture(look, pv, pu) * shading).astype(np.float32)
    canvas[mask] = np.clip(look.colour[None, :] * factor[:, None], 0, 255)


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: tuple[int, int]) -> np.ndarray:
    """(H, W) float32: unit Gaussian noise on a coarse grid, bilinearly upsampled (corners aligned)."""
    rows, cols = cells
    coarse = rng.normal(0, 1, (rows, cols))
    fy = np.linspace(0, rows - 1, height)
    fx = np.linspace(0, cols - 1, width)
    y0 = np.minimum(fy.astype(int), rows - 2)
    x0 = np.minimum(fx.astype(int), cols - 2)
    wy, wx = (fy - y0)[:, None], (fx - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - wx) + coarse[y0][:, x0 + 1] * wx
    bottom = coarse[y0 + 1][:, x0] * (1 - wx) + coarse[y0 + 1][:, x0 + 1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def _background(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32: a muted two-colour gradient with low-frequency colour noise and fine grain."""
    height, width = ys.shape
    first = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.85))
    second = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.85))
    direction = rng.uniform(0, 2 * math.pi)
    t = (xs * math.cos(direction) + ys * math.sin(direction)) / max(height, width)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    canvas = first * (1 - t[..., None]) + second * t[..., None]
    for channel in range(3):
        canvas[..., channel] += 18.0 * _smooth_field(rng, height, width, (4, 5))
    canvas += 10.0 * _smooth_field(rng, height, width, (height // 4, width // 4))[..., None]
    return canvas.astype(np.float32)


def _draw_clutter(
    rng: np.random.Generator, canvas: np.ndarray, ys: np.ndarray, xs: np.ndarray, num_classes: int
) -> None:
    """Distractors under the objects: elongated blobs, irregular polygons, thick strokes. Half of them
    take a class's saturated colour, so colour alone cannot tell objects from background."""
    height, width = ys.shape
    short = min(height, width)
    for _ in range(int(rng.integers(2, 7))):
        if rng.random() < 0.5:
            label = int(rng.integers(1, num_classes + 1))
            colour = _look(rng, label).colour
        else:
            colour = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.5), rng.uniform(0.2, 0.9))
        kind = rng.random()
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = short * rng.uniform(0.05, 0.18)
        angle = rng.uniform(0, 2 * math.pi)
        dy, dx = ys - cy, xs - cx
        u = (dx * math.cos(angle) + dy * math.sin(angle)) / radius
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / radius
        if kind < 0.35:  # elongated ellipse (aspect 2..4), unlike any class outline
            elongation = rng.uniform(2.0, 4.0)
            mask = (u / math.sqrt(elongation)) ** 2 + (v * math.sqrt(elongation)) ** 2 <= 1.0
        elif kind < 0.7:  # irregular polygon with 7..10 random radii
            n = int(rng.integers(7, 11))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radii = rng.uniform(0.45, 1.0, n)
            mask = _inside_polygon(u, v, radii * np.cos(angles), radii * np.sin(angles))
        else:  # thick stroke
            half_width = rng.uniform(1.0, 3.0) / radius
            mask = (np.abs(v) <= half_width) & (np.abs(u) <= rng.uniform(2.0, 4.0))
        shade = 1.0 + 0.1 * _smooth_field(rng, height, width, (6, 7))[mask]
        canvas[mask] = np.clip(colour[None, :] * shade[:, None], 0, 255)


def _wire(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A thin line across the whole image, drawn over the objects (it occludes them)."""
    height, width = ys.shape
    angle = rng.uniform(0, math.pi)
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    distance = np.abs(-(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle))
    colour = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.choice([0.1, 0.95]))
    return distance <= rng.uniform(0.5, 1.3), colour


def _blur(canvas: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur, edges replicated."""
    padded = np.pad(canvas, ((1, 1), (0, 0), (0, 0)), mode="edge")
    canvas = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    padded = np.pad(canvas, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4


# -------------------------------------------------------------------------------------------- labels


def _edge_band(owner: np.ndarray) -> np.ndarray:
    """bool (H, W): pixels with a 4-neighbour of another owner, i.e. both sides of every object edge."""
    band = np.zeros(owner.shape, bool)
    vertical = owner[1:] != owner[:-1]
    band[1:] |= vertical
    band[:-1] |= vertical
    horizontal = owner[:, 1:] != owner[:, :-1]
    band[:, 1:] |= horizontal
    band[:, :-1] |= horizontal
    return band
