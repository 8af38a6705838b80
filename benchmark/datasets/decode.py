"""Decoding one image file: RGB conversion and the ADM centre crop.

The crop is the convention of ADM, DiT, LightningDiT, REPA-E and RAE at 256 px
(/work/shared/reference/PAPER_SCALE.md, "The ADM centre crop"):
1. while the short side is at least twice the target, halve the image with BOX resampling;
2. resize with BICUBIC so that the short side equals the target;
3. crop the central target x target square.
ADM converts to RGB before cropping; so do we. ImageNet holds a few greyscale and CMYK JPEGs
(PAPER_SCALE.md), and folders may hold palette or alpha PNGs: every mode becomes RGB. Alpha is
dropped (``convert("RGB")``, what ADM's and torchvision's loaders do), not composited.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# Lower-case suffixes the scanner treats as images; anything else is a non-image file.
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"})


class BadImageError(ValueError):
    """A file that should be an image but cannot be decoded (truncated, corrupt, not an image)."""


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        # PIL asks for palette images with a transparent index to go through RGBA first.
        img = img.convert("RGBA")
    return img.convert("RGB")


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """The ADM centre crop of ``img`` to ``size`` x ``size`` (steps in the module docstring)."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_file(path: str, size: int, draft: bool = False) -> np.ndarray:
    """The file at ``path`` as uint8 [size, size, 3] (HWC, RGB), ADM-cropped.

    ``draft``: let libjpeg decode JPEGs at 1/2, 1/4 or 1/8 scale (DCT scaling) while the short
    side stays >= ``size``; the BOX halvings then start from that. Several times faster on
    ImageNet's ~400x350 JPEGs at small targets, but not bit-identical to ADM's full decode, so
    it is off unless ``dataset.jpeg_draft`` asks for it. Raises BadImageError for any file PIL
    cannot decode completely."""
    try:
        with Image.open(path) as img:
            if draft and img.format == "JPEG":
                img.draft("RGB", (size, size))
            img.load()  # decode now: a truncated file fails here, not later
            out = adm_center_crop(to_rgb(img), size)
    except Exception as exc:  # PIL's plug-ins raise OSError, SyntaxError, ValueError, ... for damaged files
        raise BadImageError(f"{path}: cannot decode ({type(exc).__name__}: {exc})") from exc
    return np.array(out, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)
