"""The shapes world's gold score: an eval-only judge that training never optimises.

A reward is an adversary's target (design.md §5.1): the first demo raised its checker's score by
drawing stripes. Learning is therefore measured on a second, stricter scorer that is not a reward
plugin and shares no detection code with `shapes_geneval`:

- objects are segmented by the world's palette (a pixel belongs to a colour only when its hue is
  within HUE_TOL of that colour's and it is clearly saturated), not by chroma blobs;
- an object is recognised by template matching: the soft IoU of its coverage with the ideal
  circle, square and apex-up triangle of the same area and centroid (the world draws only
  those), not by hull ratios; below MIN_IOU it is clutter;
- its size must be one the world draws (SIZE_RANGE of the canvas, with slack): specks and
  canvas-filling blobs are clutter too.

An image passes when GenEval's rules (the same `evaluate` as the reward: the rules are GenEval's,
the detection is what gets gamed) hold on the recognised objects and nothing in it is clutter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from r3rl.shapes.scene import PALETTE, SIZE_RANGE
from rewards.shapes_geneval import Detection, evaluate

HUE_TOL = 20.0  # degrees from the nearest palette colour's hue (orange/yellow are 22 apart)
MIN_SATURATION = 0.35  # HSV saturation of an object pixel (the background's is ~0.02)
MIN_IOU = 0.72  # soft IoU with the best template; honest renders score >= 0.85
SIZE_SLACK = (0.6, 1.4)  # an object's side may be this far outside SIZE_RANGE
SPECK_FRAC = 0.004  # components below this share of the canvas are ignored (noise)
SUPERSAMPLE = 8  # template coverage is rasterised at this many samples per pixel side


@dataclass(frozen=True)
class GoldObject:
    shape: str  # circle / square / triangle, or "clutter"
    color: str
    iou: float
    detection: Detection


@dataclass(frozen=True)
class GoldVerdict:
    passed: bool
    clutter: int  # components that are not a recognisable object of the world
    objects: tuple[GoldObject, ...]


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees and saturation of float RGB in 0..255."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    delta = np.where(mx > mn, mx - mn, 1.0)
    hue = np.select(
        [mx == r, mx == g], [((g - b) / delta) % 6, (b - r) / delta + 2], (r - g) / delta + 4
    )
    return hue * 60.0, np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)


_PALETTE_HUES = {name: float(_hsv(np.array(rgb, dtype=float))[0]) for name, rgb in PALETTE.items()}


def _templates(h: int, w: int, cy: float, cx: float, area: float) -> dict[str, np.ndarray]:
    """Pixel coverage (0..1) of the ideal circle, square and apex-up triangle of `area` pixels
    whose centroid is (cy, cx), supersampled."""
    s = SUPERSAMPLE
    ys = (np.arange(h * s) + 0.5) / s
    xs = (np.arange(w * s) + 0.5) / s
    y, x = np.meshgrid(ys, xs, indexing="ij")
    r = math.sqrt(area / math.pi)
    half = math.sqrt(area) / 2
    side = math.sqrt(2 * area)  # base = height, area = side^2 / 2
    top = cy - 2 * side / 3  # centroid sits a third of the height above the base
    depth = (y - top) / side  # 0 at the apex, 1 at the base
    shapes = {
        "circle": (x - cx) ** 2 + (y - cy) ** 2 <= r * r,
        "square": (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half),
        "triangle": (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= depth * side / 2),
    }
    return {k: v.reshape(h, s, w, s).mean(axis=(1, 3)) for k, v in shapes.items()}


def _box_side(shape: str, area: float) -> float:
    """Side of the square box the world draws a `shape` of `area` pixels in."""
    if shape == "circle":
        return 2 * math.sqrt(area / math.pi)
    return math.sqrt(2 * area) if shape == "triangle" else math.sqrt(area)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-9))


def gold_objects(image: Image.Image) -> list[GoldObject]:
    """Every coloured component of the image, recognised or clutter, largest first."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w = rgb.shape[:2]
    hue, sat = _hsv(rgb)
    lo, hi = SIZE_RANGE[0] * SIZE_SLACK[0], SIZE_RANGE[1] * SIZE_SLACK[1]
    found: list[GoldObject] = []
    refs = np.array(list(_PALETTE_HUES.values()))
    dist = np.abs((hue[..., None] - refs + 180.0) % 360.0 - 180.0)
    nearest = dist.argmin(-1)
    colored = (dist.min(-1) <= HUE_TOL) & (sat >= MIN_SATURATION)
    for c, name in enumerate(_PALETTE_HUES):
        member = colored & (nearest == c)
        labels, _ = ndi.label(member)
        for i, box in enumerate(ndi.find_objects(labels), start=1):
            if (labels[box] == i).sum() < SPECK_FRAC * h * w:
                continue
            grown = tuple(slice(max(b.start - 2, 0), b.stop + 2) for b in box)
            # coverage: saturation relative to the component's own, over it and its 1-px fringe
            # of weakly saturated (anti-aliased) pixels
            own = labels[grown] == i
            region = own | (ndi.binary_dilation(own) & (sat[grown] < MIN_SATURATION))
            peak = float(np.percentile(sat[grown][own], 90))
            cover = np.where(region, np.clip(sat[grown] / max(peak, 1e-6), 0.0, 1.0), 0.0)
            area = float(cover.sum())
            ys, xs = np.nonzero(cover)
            weights = cover[ys, xs]
            cy = float((ys + 0.5) @ weights / area)
            cx = float((xs + 0.5) @ weights / area)
            ious = {
                k: _soft_iou(cover, t) for k, t in _templates(*cover.shape, cy, cx, area).items()
            }
            shape, iou = max(ious.items(), key=lambda kv: kv[1])
            extent = _box_side(shape, area)  # GenEval reads boxes: their centre and size
            if iou < MIN_IOU or not lo <= extent / w <= hi:
                shape = "clutter"
            if shape == "triangle":  # its centroid sits a sixth of the box below the box centre
                cy -= extent / 6
            y, x = grown[0].start + cy, grown[1].start + cx
            box = Detection(shape, name, x / w, y / h, area / (h * w), extent / w, extent / h)
            found.append(GoldObject(shape, name, iou, box))
    return sorted(found, key=lambda o: -o.detection.area_frac)


def gold_verdict(meta: dict, image: Image.Image) -> GoldVerdict:
    """Pass = every GenEval constraint of `meta` met by the recognised objects, and no clutter."""
    objects = gold_objects(image)
    clutter = sum(o.shape == "clutter" for o in objects)
    recognised = [o.detection for o in objects if o.shape != "clutter"]
    met = all(o.ok for o in evaluate(meta, recognised))
    return GoldVerdict(met and clutter == 0, clutter, tuple(objects))


def gold_scores(metas: list[dict], images: list[Image.Image]) -> tuple[list[bool], list[bool]]:
    """(passed, has clutter) per image."""
    verdicts = [gold_verdict(m, im) for m, im in zip(metas, images, strict=True)]
    return [v.passed for v in verdicts], [v.clutter > 0 for v in verdicts]
