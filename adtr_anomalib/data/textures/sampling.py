"""Normal samples of the built-in textures: random crops of scikit-image's photos, with a faint tint."""

import functools
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from skimage import data as skdata

TEXTURE_CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel")

FloatImage = NDArray[np.floating[Any]]
BoolMask = NDArray[np.bool_]

# Crop side in source-photo pixels. Fixed (independent of image_size) so the texture scale is the same for every
# sample; the largest crop also sets the height of the test band at the bottom of each 512x512 photo.
_CROP_MIN = 176
_CROP_MAX = 216
# Rows left unused between the train band (top) and the test band (bottom), so no source pixel is in both splits.
_BAND_GAP = 8

# A faint per-category colour cast, so the RGB images look like lit photos and foreign patches differ in hue too.
_TINTS: dict[str, tuple[float, float, float]] = {
    "brick": (1.06, 0.95, 0.86),
    "grass": (0.94, 1.04, 0.88),
    "gravel": (1.01, 1.0, 0.97),
}


@functools.cache
def source_photo(category: str) -> FloatImage:
    """Load the scikit-image texture photo as a read-only float grayscale array in [0, 1].

    Args:
        category: One of :data:`TEXTURE_CATEGORIES`, the name of a ``skimage.data`` photo.

    Returns:
        The photo; cached, so every call gives the same array.
    """
    photo = np.asarray(getattr(skdata, category)(), dtype=np.float32)
    if photo.ndim == 3:
        photo = photo[..., :3].mean(axis=-1)
    photo = photo / np.float32(255.0)
    photo.setflags(write=False)
    return photo


def bands(height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Row ranges (start, stop) of the train band (top) and test band (bottom) of a source photo.

    Args:
        height: Rows of the source photo.

    Returns:
        ``(train_rows, test_rows)``, ``_BAND_GAP`` rows apart so no pixel is in both splits.
    """
    test_start = height - _CROP_MAX
    return (0, test_start - _BAND_GAP), (test_start, height)


def _random_crop(category: str, rows: tuple[int, int], image_size: int, rng: np.random.Generator) -> FloatImage:
    """Cut a random square from the given rows of the photo, apply a random dihedral transform and resize it."""
    photo = source_photo(category)
    side = int(rng.integers(_CROP_MIN, _CROP_MAX + 1))
    top = int(rng.integers(rows[0], rows[1] - side + 1))
    left = int(rng.integers(0, photo.shape[1] - side + 1))
    patch = np.rot90(photo[top : top + side, left : left + side], k=int(rng.integers(4)))
    if rng.integers(2):
        patch = patch[:, ::-1]
    # Pillow's bicubic filter widens its support when shrinking, so it also anti-aliases small image sizes.
    resized = Image.fromarray(np.ascontiguousarray(patch, dtype=np.float32)).resize(
        (image_size, image_size), Image.Resampling.BICUBIC
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _colorize(gray: FloatImage, category: str) -> FloatImage:
    """Turn a grayscale texture into RGB with the category's faint tint (an H x W x 3 view of planar memory).

    Working plane by plane is about ten times faster than broadcasting over a trailing axis of length 3.
    """
    planes = np.empty((3, *gray.shape), dtype=gray.dtype)
    for channel, factor in enumerate(_TINTS[category]):
        np.multiply(gray, gray.dtype.type(factor), out=planes[channel])
    np.clip(planes, 0.0, 1.0, out=planes)
    return np.moveaxis(planes, 0, -1)


def normal_sample(category: str, rows: tuple[int, int], image_size: int, rng: np.random.Generator) -> FloatImage:
    """Render a defect-free RGB sample of ``category`` from the given band of its photo.

    Args:
        category: One of :data:`TEXTURE_CATEGORIES`.
        rows: ``(start, stop)`` rows of the photo to crop from, as :func:`bands` gives them.
        image_size: Side of the square sample in pixels.
        rng: Random generator of the crop, rotation and flip.

    Returns:
        An ``image_size x image_size x 3`` float image in ``[0, 1]``.
    """
    return _colorize(_random_crop(category, rows, image_size, rng), category)


def to_uint8(image: FloatImage) -> NDArray[np.uint8]:
    """Quantise a [0, 1] float image to contiguous 8-bit pixels (round half to even, deterministic).

    Args:
        image: Float image; values outside [0, 1] are clipped.

    Returns:
        The ``uint8`` image, the same shape.
    """
    scaled = np.clip(image, 0.0, 1.0) * image.dtype.type(255.0)
    np.rint(scaled, out=scaled)
    return np.ascontiguousarray(scaled.astype(np.uint8))
