"""shapes_geneval: GenEval's rules checked on images of coloured shapes, without a model.

A deterministic stand-in for GenEval's detector (djghosh13/geneval,
evaluation/evaluate_images.py) in the shapes world: objects are found by colour
segmentation and connected components, their shape from their convex hull, and
GenEval's `evaluate` rules are applied to the metadata record. It needs only numpy,
scipy and Pillow, and makes no assumption about who drew the image: any light plain
background, saturated or soft colours, anti-aliased or blurred edges, noise, any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

POSITION_THRESHOLD = 0.1  # GenEval's default
MIN_CHROMA = 35.0  # above the background's: grey/white/black pixels are never objects
MIN_AREA_FRAC = 0.003  # smaller blobs are noise specks
MIN_PIXELS = 6
MIN_SHAPE_PIXELS = 16  # a smaller blob has too few pixels to have a recognisable shape: clutter
MIN_COLOR_SHARE = 0.25  # a blob splits by colour only where a colour owns this much of it
UPSAMPLE_TO = 48  # shape features are measured on a sub-pixel mask this many px across
HULL_POINTS = 32  # hull vertices kept for the inscribed-triangle search
TRIANGLE_MIN = 0.53  # largest inscribed triangle / hull: triangle ~1, square 0.5, circle 0.41
SQUARE_MIN = 0.87  # hull / smallest enclosing rectangle: square ~1, circle 0.79, triangle 0.5
# Rejection: a blob that is not recognisably one of the three shapes is clutter, never an object.
# Honest shapes (any size from 32 px, blurred, noisy, rotated) measure solidity >= 0.91 and
# aspect <= 1.23; the blob rows, stripes and drop grids RL runs drew measure 0.69-0.89 / 1.5-2.9.
SOLIDITY_MIN = 0.88  # blob area / its convex hull: merged shapes, smears and drops are concave
ASPECT_MAX = 1.35  # long / short side of the smallest enclosing rectangle: ovals, bars, stripes
CIRCLE_RECT_MIN = 0.70  # hull / enclosing rectangle below a circle's pi/4 (softened): a lens or a blot
CLUTTER = "clutter"
# Hue (degrees) upper bounds of each colour name; red wraps around 0.
HUES = (
    (18, "red"),
    (45, "orange"),
    (75, "yellow"),
    (165, "green"),
    (255, "blue"),
    (335, "purple"),
    (360, "red"),
)
COLOR_NAMES = ("red", "orange", "yellow", "green", "blue", "purple")


@dataclass(frozen=True)
class Detection:
    """One object: centre (cx, cy) and box size (w, h) as canvas fractions, as GenEval's
    boxes; area_frac is its area over the canvas area. shape is CLUTTER for a blob that is
    recognisably none of the three shapes."""

    shape: str
    color: str
    cx: float
    cy: float
    area_frac: float
    w: float
    h: float


@dataclass(frozen=True)
class Outcome:
    """One GenEval constraint of a record and whether the detections meet it.

    kind is "count" / "color" / "position" for include[index], "exclude" for exclude[index];
    found holds the objects the clause matched (all of the class for an exclude).
    """

    kind: str
    index: int
    ok: bool
    reason: str
    found: tuple[Detection, ...]


# ---------------------------------------------------------------- detection


def _to_rgb(image) -> np.ndarray:
    """PIL image, or HxWx3 / 3xHxW array (uint8, or float in [0, 1]) -> float HxWx3 in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
    return arr * 255.0 if arr.max() <= 1.0 else arr


def _hue_index(rgb: np.ndarray) -> np.ndarray:
    """Index into COLOR_NAMES of each pixel's hue (meaningful where chroma is high)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.degrees(np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    bounds = np.array([h for h, _ in HUES])
    names = [name for _, name in HUES]
    return np.array([COLOR_NAMES.index(n) for n in names])[
        np.searchsorted(bounds, hue, side="right").clip(0, len(names) - 1)
    ]


@dataclass(frozen=True)
class ShapeFeatures:
    """Rotation- and scale-invariant measures of one blob that only soften with blur.

    tri: largest inscribed triangle / hull area (triangle ~1, square 0.5, circle 0.41);
    rect: hull / smallest enclosing rectangle (square ~1, circle pi/4, triangle 0.5);
    solidity: blob area / hull area (1 for the three convex shapes);
    aspect: long / short side of that smallest rectangle (1 for all three drawn in a square box,
    up to 1.25 for a triangle measured along a slanted side).
    """

    tri: float
    rect: float
    solidity: float
    aspect: float


def shape_features(mask: np.ndarray) -> ShapeFeatures:
    edge = mask & ~ndi.binary_erosion(mask)
    ys, xs = np.nonzero(edge)
    corners = np.concatenate(
        [np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]
    ).astype(float)
    hull = ConvexHull(corners)
    poly = corners[hull.vertices]
    area = hull.volume
    pts = poly[np.linspace(0, len(poly) - 1, min(len(poly), HULL_POINTS)).astype(int)]
    d = pts[None, :, :] - pts[:, None, :]  # d[i, j] = p_j - p_i
    tri = (
        np.abs(d[:, :, None, 0] * d[:, None, :, 1] - d[:, :, None, 1] * d[:, None, :, 0]).max() / 2
    )
    edges = np.roll(poly, -1, axis=0) - poly
    angle = np.arctan2(edges[:, 1], edges[:, 0])
    u = poly @ np.stack([np.cos(angle), np.sin(angle)])
    v = poly @ np.stack([-np.sin(angle), np.cos(angle)])
    width, height = u.max(0) - u.min(0), v.max(0) - v.min(0)
    best = int(np.argmin(width * height))
    long, short = max(width[best], height[best]), min(width[best], height[best])
    # the blob's pixels are unit squares: count them against the hull of their corners
    return ShapeFeatures(tri / area, area / (width[best] * height[best]), float(mask.sum()) / area, long / short)


def _classify(mask: np.ndarray) -> str:
    """circle / square / triangle, or CLUTTER when the blob is recognisably none of them."""
    f = shape_features(mask)
    if f.solidity < SOLIDITY_MIN or f.aspect > ASPECT_MAX:
        return CLUTTER
    if f.tri >= TRIANGLE_MIN:
        return "triangle"
    if f.rect >= SQUARE_MIN:
        return "square"
    return "circle" if f.rect >= CIRCLE_RECT_MIN else CLUTTER


def _pieces(
    region: np.ndarray, chroma: np.ndarray, level: float, min_px: float
) -> list[tuple[str, float, tuple]]:
    """Objects in one colour region of a crop: threshold its chroma at `level` on an
    upsampled copy (sub-pixel edges for small objects). Returns (shape, area in pixels,
    (top, left, bottom, right) in crop pixels) for each large enough piece."""
    crop = np.where(region, chroma, 0.0)
    k = int(np.clip(math.ceil(UPSAMPLE_TO / max(crop.shape)), 1, 8))
    if k > 1:
        crop = ndi.zoom(crop, k, order=1, grid_mode=True, mode="grid-constant")
    labels, _ = ndi.label(crop >= level, structure=np.ones((3, 3)))
    pieces = []
    for i, (rows, cols) in enumerate(ndi.find_objects(labels), start=1):
        piece = ndi.binary_fill_holes(labels[rows, cols] == i)
        area = float(piece.sum()) / k**2
        if area < min_px:
            continue
        try:
            shape = _classify(piece) if area >= MIN_SHAPE_PIXELS else CLUTTER
        except QhullError:  # degenerate (a line): not an object
            continue
        pieces.append((shape, area, (rows.start / k, cols.start / k, rows.stop / k, cols.stop / k)))
    return pieces


def detect(image) -> list[Detection]:
    """Find the coloured shapes in an image, largest first.

    Foreground = pixels clearly more saturated than the background (estimated from the
    border). Each connected blob takes the colour that dominates its pixels' hues, or is
    split by colour where two colours each own a real share (touching objects). Edges are
    placed half-way between the background's chroma and the object's, which undoes blur
    and anti-aliasing; blobs under MIN_AREA_FRAC of the canvas are ignored.
    """
    rgb = _to_rgb(image)
    height, width = rgb.shape[:2]
    chroma = rgb.max(-1) - rgb.min(-1)
    border = np.concatenate([chroma[0], chroma[-1], chroma[:, 0], chroma[:, -1]])
    bg_chroma = float(np.median(border))
    fg = chroma >= bg_chroma + MIN_CHROMA
    hue = _hue_index(rgb)
    min_px = max(MIN_PIXELS, MIN_AREA_FRAC * width * height)
    blobs, _ = ndi.label(fg, structure=np.ones((3, 3)))
    found: list[Detection] = []
    for i, box in enumerate(ndi.find_objects(blobs), start=1):
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)  # room for the fringe
        blob, hues, others = blobs[box] == i, hue[box], fg[box] & (blobs[box] != i)
        if blob.sum() < min_px:
            continue
        counts = np.bincount(hues[blob], minlength=len(COLOR_NAMES))
        colors = [
            c for c in np.argsort(-counts) if counts[c] >= max(min_px, MIN_COLOR_SHARE * blob.sum())
        ]
        for c in colors:
            own = blob if len(colors) == 1 else blob & (hues == c)
            region = ndi.binary_dilation(own) & ~(
                others | (blob & ~own)
            )  # own pixels + soft fringe
            peak = float(np.percentile(chroma[box][own], 90))
            level = (bg_chroma + peak) / 2
            for shape, area, (top, left, bottom, right) in _pieces(
                region, chroma[box], level, min_px
            ):
                top, bottom = top + box[0].start, bottom + box[0].start
                left, right = left + box[1].start, right + box[1].start
                found.append(
                    Detection(
                        shape=shape,
                        color=COLOR_NAMES[c],
                        cx=(left + right) / 2 / width,
                        cy=(top + bottom) / 2 / height,
                        area_frac=area / (width * height),
                        w=(right - left) / width,
                        h=(bottom - top) / height,
                    )
                )
    return sorted(found, key=lambda d: -d.area_frac)


# ---------------------------------------------------------------- GenEval rules


def relative_position(
    a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """GenEval's relative_position: where `a` is relative to `b`, factoring in box sizes."""
    offset = np.array([a.cx - b.cx, a.cy - b.cy])
    dims = np.array([a.w + b.w, a.h + b.h])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def exclude_clauses(meta: dict) -> list[dict]:
    """GenEval's counting records carry exclude = count + 1; supply it when a file omits it."""
    if "exclude" in meta or meta.get("tag") != "counting":
        return list(meta.get("exclude", []))
    return [{"class": r["class"], "count": r["count"] + 1} for r in meta["include"]]


def evaluate(meta: dict, detections: list[Detection]) -> list[Outcome]:
    """Every constraint of a GenEval record, judged as GenEval's `evaluate` does.

    An include needs `count` objects of its class; GenEval keeps its detector's most
    confident ones, here those of the wanted colour first, then the largest. Its colour
    must hold for all of them; its position must hold between each of them and each
    object matched by the include it names. A constraint GenEval skips (colour when the
    count fails, position when anything before it failed) counts as failed. An exclude
    fails at `count` objects of its class.
    """
    outcomes: list[Outcome] = []
    groups: list[tuple[Detection, ...] | None] = []
    for i, req in enumerate(meta.get("include", [])):
        cls, n, color = req["class"], req.get("count", 1), req.get("color")
        pool = sorted(
            (d for d in detections if d.shape == cls),
            key=lambda d: (d.color != color, -d.area_frac),
        )
        found = tuple(pool[:n])
        matched = len(found) >= n
        outcomes.append(
            Outcome(
                "count",
                i,
                matched,
                "" if matched else f"expected {cls}>={n}, found {len(pool)}",
                found,
            )
        )
        if color is not None:
            hits = sum(d.color == color for d in found)
            ok = matched and hits >= n
            seen = ", ".join(
                f"{sum(d.color == c for d in found)} {c}"
                for c in COLOR_NAMES
                if any(d.color == c for d in found)
            )
            outcomes.append(
                Outcome(
                    "color",
                    i,
                    ok,
                    "" if ok else f"expected {color} {cls}>={n}, found {hits} {color}; and {seen}",
                    found,
                )
            )
            matched = ok
        if "position" in req:
            rel, j = req["position"]
            target = groups[j] if j < len(groups) else None
            if not matched or target is None:
                ok, reason = False, f"no target for {cls} to be {rel}"
            else:
                bad = next(
                    ((a, b) for a in found for b in target if rel not in relative_position(a, b)),
                    None,
                )
                ok = bad is None
                reason = (
                    ""
                    if ok
                    else f"expected {cls} {rel} target, found {' and '.join(sorted(relative_position(*bad)))} target"
                )
            outcomes.append(Outcome("position", i, ok, reason, found))
            matched = ok
        groups.append(found if matched else None)
    for i, req in enumerate(exclude_clauses(meta)):
        pool = tuple(d for d in detections if d.shape == req["class"])
        ok = len(pool) < req["count"]
        outcomes.append(
            Outcome(
                "exclude",
                i,
                ok,
                "" if ok else f"expected {req['class']}<{req['count']}, found {len(pool)}",
                pool,
            )
        )
    return outcomes


def clutter_share(detections: list[Detection]) -> float:
    """Share of the detected foreground area that is clutter (0 when nothing was found)."""
    total = sum(d.area_frac for d in detections)
    return sum(d.area_frac for d in detections if d.shape == CLUTTER) / total if total else 0.0


def check(meta: dict, detections: list[Detection]) -> tuple[float, list[str]]:
    """(fraction of the record's constraints met, GenEval-style reasons for each failure).

    Clutter never counts as an object of any class (GenEval's detector drops what it cannot
    recognise); the reward adds its own penalty for it (`ShapesGenEval`)."""
    outcomes = evaluate(meta, detections)
    if not outcomes:
        return 1.0, []
    return sum(o.ok for o in outcomes) / len(outcomes), [o.reason for o in outcomes if not o.ok]


def score(meta: dict, detections: list[Detection], partial_credit: bool) -> float:
    """The reward of one image: constraints met, discounted by clutter.

    An image full of junk must not pass: with partial credit the fraction met is scaled by the
    square of the share of the foreground that is recognisable (a row of blobs that happens to
    contain one circle earns little); without it, an image passes only if every constraint is met
    and nothing in it is clutter."""
    frac, _ = check(meta, detections)
    clutter = clutter_share(detections)
    if partial_credit:
        return frac * (1.0 - clutter) ** 2
    return float(frac == 1.0 and clutter == 0.0)


class ShapesGenEval:
    """Reward: 1.0 when an image meets its GenEval record with nothing unrecognisable in it,
    else 0.0; with partial_credit, the fraction of constraints met times the squared recognisable
    share of the foreground. A sample without an `include` record scores None (cannot be scored),
    never 0."""

    def __init__(self, partial_credit: bool = False):
        self.partial_credit = partial_credit

    def __call__(self, prompts, images, metadata=None, **kwargs) -> list[float | None]:
        metadata = metadata if metadata is not None else [None] * len(images)
        scores: list[float | None] = []
        for image, meta in zip(images, metadata, strict=True):
            if not meta or not meta.get("include"):
                scores.append(None)
                continue
            scores.append(score(meta, detect(image), self.partial_credit))
        return scores
