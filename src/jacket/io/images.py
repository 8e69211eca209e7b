"""A folder or glob of images as model inputs: a lazy `ImageStack`, read one batch at a time."""

from __future__ import annotations

import glob
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import JacketValueError
from .files import optional

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageStack:
    """A folder of images as a lazy array `(n, height, width[, channels])` of float32 in [0, 1].

    Images are read (and resized when their size differs) only when sliced, so `iter_batches`
    streams a large folder through without holding it in memory. `np.asarray(stack)` reads all.

    Attributes:
      files: the image paths, sorted by name (sample `i` is `files[i]`).
      shape: `(n, height, width, channels)`, or `(n, height, width)` for a 2-D model input.
    """

    def __init__(self, files: list[Path], size: tuple[int, int], mode: str, channel_axis: bool):
        self.files = list(files)
        self.size = size
        self.mode = mode
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        self.shape = (len(files), *size) + ((channels,) if channel_axis else ())
        self.dtype = np.dtype("float32")
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return np.stack([self._read(f) for f in self.files[index]]).reshape(
                (-1,) + self.shape[1:]
            )
        return self._read(self.files[index])

    def __array__(self, dtype=None, copy=None):
        array = self[:]
        return array if dtype is None else array.astype(dtype)

    def _read(self, file: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(file) as image:
                image = image.convert(self.mode)
                height, width = self.size
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, ValueError) as error:
            raise JacketValueError(f"cannot read image {str(file)!r}: {error}") from None
        return array.reshape(self.shape[1:])


def is_glob(text: str) -> bool:
    """Whether `text` is a glob pattern rather than a path."""
    return any(c in text for c in "*?[")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def glob_images(pattern: str) -> list[Path]:
    """The image files `pattern` matches, sorted."""
    return sorted(p for p in map(Path, glob.glob(pattern, recursive=True)) if _is_image(p))


def folder_images(folder: Path) -> list[Path]:
    """The image files in `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if _is_image(p))


def read_images(files: list[Path], declared, size, source: str) -> ImageStack:
    """`files` as an `ImageStack` for a model whose declared inputs are `declared` (see
    `jacket.io.read_inputs`), checked (headers only) before any work."""
    optional("PIL", "reading images", package="pillow")
    from PIL import Image, UnidentifiedImageError

    if isinstance(declared, (Mapping, list, tuple)):
        raise JacketValueError(
            f"images make one input, but the model takes {len(declared)}. Pass an .npz file with "
            "one array per input name."
        )
    sizes, modes = [], []
    for file in files:  # headers only: a broken file is found before any work
        try:
            with Image.open(file) as image:
                sizes.append((image.height, image.width))
                modes.append(image.mode)
        except (UnidentifiedImageError, OSError) as error:
            raise JacketValueError(
                f"cannot read image {str(file)!r}: the file is corrupt or not an image ({error})."
            ) from None
    shape = tuple(declared.shape[1:]) if declared is not None else None
    if shape is None:
        channel_axis = True
        mode = "L" if modes[0] in ("L", "1", "I", "I;16", "F") else "RGB"
        target = size
    elif len(shape) in (2, 3):
        channel_axis = len(shape) == 3
        channels = shape[2] if channel_axis else 1
        modes = {1: "L", 3: "RGB", 4: "RGBA"}
        if channels not in modes:
            raise JacketValueError(
                f"the model's input shape {shape} is not an image with 1, 3 or 4 channels, so "
                f"images ({source!r}) cannot feed it. Pass an .npy file instead."
            )
        mode = modes[channels]
        known = shape[0] is not None and shape[1] is not None
        target = size if size is not None else (tuple(shape[:2]) if known else None)
        if size is not None and known and tuple(size) != tuple(shape[:2]):
            raise JacketValueError(
                f"--size {size[0]}x{size[1]} does not fit the model, which takes images of "
                f"{shape[0]}x{shape[1]}. Pass --size {shape[0]}x{shape[1]}."
            )
    else:
        raise JacketValueError(
            f"the model's input shape {shape} is not an image shape (height, width[, channels]), "
            f"so images ({source!r}) cannot feed it. Pass an .npy file instead."
        )
    if target is None:
        raise JacketValueError(
            f"the model does not fix its input size: pass --size HEIGHTxWIDTH to read {source!r}."
        )
    if size is None:
        for file, found in zip(files, sizes):
            if found != tuple(target):
                raise JacketValueError(
                    f"image {str(file)!r} is {found[0]}x{found[1]}, but the model takes "
                    f"{target[0]}x{target[1]}. Pass --size {target[0]}x{target[1]} to resize."
                )
    return ImageStack(files, (int(target[0]), int(target[1])), mode, channel_axis)
