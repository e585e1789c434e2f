"""A folder of JPEG and PNG images as a stream's input, decoded as the samples are read.

Each image is decoded by Pillow, resized so its shorter side is 256/224 of the network's input size,
cropped to the centre and normalised with ImageNet's mean and deviation (as torchvision's evaluation
transforms do), in a thread pool (Pillow releases the GIL while it decodes and resizes). A stream reads
each device's next chunk while the current one computes, so decoding runs beside inference; on a CPU
that also infers, the decoding slows its inference, and the stream, which hands out chunks to whichever
device is free, gives it fewer.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import HeteroError, UnreadableInput, one_line

EXTENSIONS = {".jpg", ".jpeg", ".png"}
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
RESIZE = 256 / 224  # the shorter side before the centre crop, as a share of the crop


class ImageFolder:
    """The images under `folder` (sorted by path) as an array-like of shape (N, 3, H, W), float32."""

    def __init__(self, folder: Path, sample_shape: tuple[int, ...], threads: int | None = None):
        if len(sample_shape) != 3 or sample_shape[0] != 3:
            raise HeteroError(f"{folder}: images make samples of shape (3, H, W); this network takes {sample_shape}")
        try:
            from PIL import Image  # noqa: F401 -- a clear line now rather than at the first chunk
        except ImportError:
            raise HeteroError("a folder of images needs Pillow: pip install 'hetero[images]'") from None
        self.folder = folder
        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not self.files:
            raise HeteroError(f"{folder}: no .jpg, .jpeg or .png images in it")
        self.shape = (len(self.files), *sample_shape)
        self.dtype = np.dtype(np.float32)
        self._pool = ThreadPoolExecutor(threads or os.cpu_count() or 1, "hetero-decode")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: slice) -> np.ndarray:
        files = self.files[index]
        return np.stack(list(self._pool.map(self._decode, files))) if files else np.empty((0, *self.shape[1:]))

    def identity(self) -> dict:
        """What the samples depend on: the folder and each image's name, size and time."""
        listing = hashlib.sha256()
        for path in self.files:
            stat = path.stat()
            listing.update(f"{path.relative_to(self.folder)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
        return {"folder": str(self.folder.resolve()), "images": listing.hexdigest()}

    def _decode(self, path: Path) -> np.ndarray:
        from PIL import Image

        height, width = self.shape[2:]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                short = round(max(height, width) * RESIZE)  # the shorter side, the other in proportion (rounded down)
                if image.width <= image.height:
                    size = (short, max(height, int(short * image.height / image.width)))
                else:
                    size = (max(width, int(short * image.width / image.height)), short)
                image = image.resize(size, Image.Resampling.BILINEAR)
                left, top = (image.width - width) // 2, (image.height - height) // 2
                pixels = np.asarray(image.crop((left, top, left + width, top + height)), np.float32)
        except (OSError, ValueError) as exc:  # not an image, truncated, an unknown mode
            raise UnreadableInput(f"{path}: cannot decode the image ({one_line(exc)})") from None
        return ((pixels / 255 - MEAN) / STD).transpose(2, 0, 1)
