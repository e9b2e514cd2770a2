"""Image files on disk as tensors, and the two pixel conventions used across dd.

Conventions (shared with :mod:`dd.data.fashion_mnist`):

* *model images*: float32 ``(3, H, W)`` (or ``(B, 3, H, W)``) in ``[-1, 1]``; what tokenizers and teachers consume.
* *uint8 images*: uint8 ``(B, 3, H, W)`` in ``[0, 255]``; what metrics (torch-fidelity, the ADM evaluator ``.npz``)
  consume.

:class:`ImageFolderDataset` reads PNG/JPEG files (optionally sorted into class subfolders) and yields model images
so that reference statistics can be computed for arbitrary data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
UNLABELLED: int = -1


def uint8_to_model_images(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels ``[0, 255]`` to float32 ``[-1, 1]`` (0 -> -1, 255 -> 1); any shape."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.to(torch.float32).div(127.5).sub(1.0)


def model_images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map float images in ``[-1, 1]`` to uint8 ``[0, 255]``; any shape.

    Uses round-to-nearest of ``(x + 1) * 127.5`` after clamping, so that
    ``model_images_to_uint8(uint8_to_model_images(u)) == u`` exactly.
    """
    if not images.is_floating_point():
        raise TypeError(f"expected floating-point images, got {images.dtype}")
    scaled = (images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return scaled.round().to(torch.uint8)


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop a PIL image to a square (side = shorter side), then resize to ``size x size`` (bicubic)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == size:
        return square
    return square.resize((size, size), resample=Image.Resampling.BICUBIC)


def find_image_files(root: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """All files under ``root`` (recursively) with one of ``extensions`` (case-insensitive), sorted by path."""
    suffixes = {ext.lower() for ext in extensions}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def _class_of(path: Path, root: Path) -> str | None:
    """Name of the first-level subfolder of ``root`` holding ``path``; None for files directly in ``root``."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


class ImageFolderDataset(Dataset):
    """PNG/JPEG images under a folder, as model images ``(3, size, size)`` float32 in ``[-1, 1]`` plus a label.

    Labels: if images sit in first-level subfolders, each subfolder is a class (``class_names`` sorted, label = index);
    images directly in ``root`` get label ``UNLABELLED`` (-1). Deeper nesting is allowed and belongs to the
    first-level folder. Grayscale images are replicated to 3 channels; non-square images are centre-cropped; all are
    resized to ``size`` (bicubic).
    """

    def __init__(self, root: str | Path, size: int, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.size = size
        self.files = find_image_files(self.root, extensions)
        if not self.files:
            raise FileNotFoundError(f"no images with extensions {extensions} under {self.root}")
        folders = {_class_of(p, self.root) for p in self.files}
        self.class_names: list[str] = sorted(name for name in folders if name is not None)
        index = {name: i for i, name in enumerate(self.class_names)}
        self.labels = [index.get(_class_of(p, self.root), UNLABELLED) for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def load_uint8(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 ``(3, size, size)``."""
        with Image.open(self.files[i]) as image:
            rgb = center_crop_resize(image.convert("RGB"), self.size)
            array = np.asarray(rgb, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return uint8_to_model_images(self.load_uint8(i)), self.labels[i]


def load_image_folder_uint8(root: str | Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a folder as uint8 ``(N, 3, size, size)`` plus int64 labels ``(N,)`` (see ImageFolderDataset)."""
    dataset = ImageFolderDataset(root, size)
    images = torch.stack([dataset.load_uint8(i) for i in range(len(dataset))])
    return images, torch.tensor(dataset.labels, dtype=torch.int64)
