"""Defect painters of the built-in textures: scratch, hole, stain and foreign material, each with its exact mask."""

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

from .sampling import TEXTURE_CATEGORIES, BoolMask, FloatImage, normal_sample, source_photo, to_uint8

DEFECT_TYPES: tuple[str, ...] = ("scratch", "hole", "stain", "foreign")

# Allowed defect area as a fraction of the image, and the minimum mean absolute change (0..1 intensity units)
# inside the mask; a sampled defect outside these limits is redrawn, so every defect is sized sensibly and visible.
_MIN_COVERAGE = 0.002
_MAX_COVERAGE = 0.05
_MIN_CONTRAST = 0.06
_MAX_ATTEMPTS = 200
_NEGLIGIBLE_CHANGE = 0.25 / 255.0


def paint_defect(
    clean: FloatImage, defect: str, category: str, rng: np.random.Generator
) -> tuple[FloatImage, BoolMask]:
    """Paint one defect of type ``defect`` on ``clean``; redraw until its size and visibility are in range.

    Args:
        clean: Defect-free square RGB float image in ``[0, 1]``.
        defect: One of :data:`DEFECT_TYPES`.
        category: Texture of ``clean``; foreign material is cut from another one.
        rng: Random generator; the same state gives the same defect.

    Returns:
        The defective image, in ``clean``'s dtype, and its boolean mask.

    Raises:
        RuntimeError: If no defect in range was drawn in ``_MAX_ATTEMPTS`` tries.
    """
    painter = _PAINTERS[defect]
    for _ in range(_MAX_ATTEMPTS):
        out, mask = painter(clean, category, rng)
        # Drop invisible changes (blur tails far below one grey level) and return to the clean image's precision,
        # so every pixel away from the defect stays bit-identical to the defect-free crop.
        out = np.where(np.abs(out - clean) < _NEGLIGIBLE_CHANGE, clean, out).astype(clean.dtype)
        coverage = float(mask.mean())
        if not _MIN_COVERAGE <= coverage <= _MAX_COVERAGE:
            continue
        change = np.abs(to_uint8(out).astype(np.int16) - to_uint8(clean).astype(np.int16)).mean(axis=-1)
        if change[mask].mean() / 255.0 >= _MIN_CONTRAST:
            return out, mask
    msg = f"could not draw a valid {defect!r} defect in {_MAX_ATTEMPTS} attempts"  # pragma: no cover
    raise RuntimeError(msg)  # pragma: no cover


def _grid(size: int) -> tuple[FloatImage, FloatImage]:
    """Row and column coordinate grids of a square image (broadcastable)."""
    coords = np.arange(size, dtype=np.float64)
    return coords[:, None], coords[None, :]


def _luma(image: FloatImage) -> FloatImage:
    """Per-pixel brightness of an RGB image."""
    return image.mean(axis=-1)


def _blob(size: int, radius: float, rng: np.random.Generator, softness: float = 1.0) -> FloatImage:
    """Draw an irregular, anti-aliased blob (1 inside, 0 outside) fully inside a ``size`` x ``size`` image.

    The outline is an ellipse whose radius is modulated by a few random low harmonics, which gives organic,
    non-convex shapes similar to spills and debris.
    """
    harmonics = np.arange(2, 6)
    amplitudes = rng.uniform(0.0, 0.3, size=harmonics.size) / harmonics
    phases = rng.uniform(0.0, 2 * np.pi, size=harmonics.size)
    aspect = rng.uniform(0.6, 1.0)
    angle = rng.uniform(0.0, np.pi)
    reach = radius * (1.0 + amplitudes.sum())  # largest possible extent from the centre
    margin = min(reach + 2.0, size / 2.0)
    center = rng.uniform(margin, size - margin, size=2)

    rows, cols = _grid(size)
    dy, dx = rows - center[0], cols - center[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    dist = np.hypot(u, v)
    theta = np.arctan2(v, u)
    wiggle = amplitudes[:, None, None] * np.cos(harmonics[:, None, None] * theta + phases[:, None, None])
    outline = radius * (1.0 + wiggle.sum(axis=0))
    return np.clip((outline - dist) / softness + 0.5, 0.0, 1.0)


def _smooth_noise(size: int, scale: float, rng: np.random.Generator) -> FloatImage:
    """Low-frequency noise in roughly [-1, 1], used to make painted surfaces non-uniform."""
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=max(scale, 1.0), mode="wrap")
    return noise / (np.abs(noise).max() + 1e-12)


def _wavy(t: NDArray[np.float64], low: float, high: float, rng: np.random.Generator) -> NDArray[np.float64]:
    """Return a smooth random profile in [-1, 1] along ``t`` in [0, 1]: two sines with random frequencies."""
    freqs = rng.uniform(low, high, size=2)
    phases = rng.uniform(0.0, 2 * np.pi, size=2)
    return 0.5 * (np.sin(2 * np.pi * freqs[0] * t + phases[0]) + np.sin(2 * np.pi * freqs[1] * t + phases[1]))


def _paint_scratch(clean: FloatImage, category: str, rng: np.random.Generator) -> tuple[FloatImage, BoolMask]:
    """Paint a thin, tapered, curved line (cubic Bezier) that is lighter or darker than the surface around it."""
    del category  # same look on every texture
    size = clean.shape[0]
    length = rng.uniform(0.3, 0.65) * size
    angle = rng.uniform(0.0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])  # (row, col)
    normal = np.array([-direction[1], direction[0]])
    center = rng.uniform(0.25 * size, 0.75 * size, size=2)
    start = center - direction * length / 2
    bends = rng.uniform(-0.2, 0.2, size=2) * length
    controls = np.stack(
        [
            start,
            start + direction * length / 3 + normal * bends[0],
            start + direction * 2 * length / 3 + normal * bends[1],
            start + direction * length,
        ]
    )
    t = np.linspace(0.0, 1.0, int(np.ceil(length * 6)) + 2)
    weights = np.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3], axis=1)
    # A sub-pixel sideways wobble keeps the line from looking ruler-drawn.
    wobble = _wavy(t, 2.0, 5.0, rng) * rng.uniform(0.15, 0.35) * max(1.0, size / 256)
    curve = weights @ controls + wobble[:, None] * normal

    half_width = max(0.5, rng.uniform(0.5, 1.5) * size / 256)
    widths = np.maximum(0.5, half_width * (0.45 + 0.55 * np.sin(np.pi * t) ** 0.5))  # tapered ends
    strength = rng.uniform(0.6, 0.9) * (0.75 + 0.25 * _wavy(t, 3.0, 9.0, rng))  # uneven depth along the groove

    # Anti-aliased coverage from the distance of each nearby pixel centre to the sampled curve.
    reach = widths.max() + 1.0
    lo = np.clip(np.floor(curve.min(axis=0) - reach), 0, size - 1).astype(int)
    hi = np.clip(np.ceil(curve.max(axis=0) + reach), 0, size - 1).astype(int)
    rr, cc = np.mgrid[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1]
    points = np.column_stack([rr.ravel(), cc.ravel()]).astype(np.float64)
    dist, nearest = cKDTree(curve).query(points, distance_upper_bound=reach)
    near = np.isfinite(dist)
    alpha = np.zeros(size * size)
    weight = np.zeros(size * size)
    flat = rr.ravel()[near] * size + cc.ravel()[near]
    alpha[flat] = np.clip(widths[nearest[near]] + 0.5 - dist[near], 0.0, 1.0)
    weight[flat] = strength[nearest[near]]
    alpha = alpha.reshape(size, size)
    weight = weight.reshape(size, size)
    mask = alpha >= 0.5

    lighter = _luma(clean)[mask].mean() < 0.55 if mask.any() else True
    target = np.array([0.95, 0.93, 0.9]) if lighter else np.array([0.1, 0.09, 0.08])
    amount = (alpha * weight)[..., None]
    return clean + amount * (target - clean), mask


def _paint_hole(clean: FloatImage, category: str, rng: np.random.Generator) -> tuple[FloatImage, BoolMask]:
    """Paint a dark elliptical pit, shaded as a cavity lit from one side, with a soft raised rim."""
    del category
    size = clean.shape[0]
    semi_a = rng.uniform(0.032, 0.075) * size
    semi_b = semi_a * rng.uniform(0.65, 1.0)
    angle = rng.uniform(0.0, np.pi)
    margin = 1.4 * semi_a + 2.0
    center = rng.uniform(margin, size - margin, size=2)
    light = rng.uniform(0.0, 2 * np.pi)

    rows, cols = _grid(size)
    dy, dx = rows - center[0], cols - center[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / semi_a
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / semi_b
    r = np.hypot(u, v)
    facing = (dy * np.sin(light) + dx * np.cos(light)) / np.maximum(np.hypot(dx, dy), 1e-9)  # +1 towards light

    edge = 1.0 / min(semi_a, semi_b)  # one pixel in normalised radius units
    pit = np.clip((1.0 - r) / (2.0 * edge) + 0.5, 0.0, 1.0)
    # The wall nearest the light is in shadow, the far wall catches light; the bottom is darkest.
    depth_shade = (0.22 + 0.3 * np.minimum(r, 1.0) ** 2) * (1.0 - 0.45 * np.minimum(r, 1.0) * facing)
    interior = clean * depth_shade[..., None]
    rim = np.exp(-(((r - 1.1) / 0.12) ** 2)) * (1.0 - pit)
    rim_shift = rim * (0.16 * facing - 0.05)  # lit lip towards the light, slightly dirty elsewhere

    out = clean * (1.0 - pit[..., None]) + interior * pit[..., None] + rim_shift[..., None]
    mask = (pit >= 0.5) | (r <= 1.18)
    return out, mask


_STAIN_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.3, 0.28, 0.26),  # dark oil / soot
    (0.75, 0.42, 0.22),  # rust
    (0.5, 0.38, 0.24),  # coffee / mud
    (0.36, 0.42, 0.5),  # bluish-grey chemical
)


def _paint_stain(clean: FloatImage, category: str, rng: np.random.Generator) -> tuple[FloatImage, BoolMask]:
    """Paint a soft-edged, mottled blob that darkens and tints the surface; the mask is where its cover >= 0.5."""
    del category
    size = clean.shape[0]
    radius = rng.uniform(0.05, 0.1) * size
    cover = ndimage.gaussian_filter(_blob(size, radius, rng), sigma=max(0.8, 0.08 * radius))
    mottling = 0.85 + 0.15 * _smooth_noise(size, radius / 3, rng)
    opacity = rng.uniform(0.55, 0.85)
    alpha = np.clip(opacity * cover * mottling, 0.0, 1.0)
    color = np.asarray(_STAIN_COLORS[int(rng.integers(len(_STAIN_COLORS)))])
    out = clean * (1.0 - alpha[..., None] * (1.0 - color))
    return out, cover >= 0.5


def _paint_foreign(clean: FloatImage, category: str, rng: np.random.Generator) -> tuple[FloatImage, BoolMask]:
    """Blend in an irregular patch of one of the other textures, like a piece of foreign material."""
    size = clean.shape[0]
    others = [c for c in TEXTURE_CATEGORIES if c != category]
    other = others[int(rng.integers(len(others)))]
    photo_rows = (0, source_photo(other).shape[0])
    patch = normal_sample(other, photo_rows, size, rng)
    radius = rng.uniform(0.06, 0.11) * size
    cover = ndimage.gaussian_filter(_blob(size, radius, rng), sigma=0.7)
    # A thin contact shadow just outside the patch makes it sit on the surface instead of looking pasted.
    shadow = np.clip(ndimage.gaussian_filter(cover, sigma=1.5) - cover, 0.0, 1.0)
    shaded = clean * (1.0 - 0.5 * shadow[..., None])
    out = shaded * (1.0 - cover[..., None]) + patch * cover[..., None]
    return out, cover >= 0.5


_PAINTERS: dict[str, Callable[[FloatImage, str, np.random.Generator], tuple[FloatImage, BoolMask]]] = {
    "scratch": _paint_scratch,
    "hole": _paint_hole,
    "stain": _paint_stain,
    "foreign": _paint_foreign,
}
