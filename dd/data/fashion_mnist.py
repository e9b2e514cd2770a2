"""Fashion-MNIST read straight from the Debian ``dataset-fashion-mnist`` IDX files (no download).

The tiny tokenizer, teacher and the FID classifier all see Fashion-MNIST as 32x32 RGB: the 28x28 grayscale images
are zero-padded by 2 px on each side (black, the dataset's background colour) and replicated to 3 channels.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dd.data.image_folder import uint8_to_model_images

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SIZE = 32
PAD = 2
Split = Literal["train", "test"]

_FILE_PREFIX: dict[str, str] = {"train": "train", "test": "t10k"}
_IDX_DTYPE_UBYTE = 0x08


def _idx_path(root: Path, split: Split, kind: Literal["images", "labels"]) -> Path:
    """Path of ``<prefix>-<kind>-idx{3,1}-ubyte[.gz]``; raises a FileNotFoundError with install instructions."""
    if split not in _FILE_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    ndim = 3 if kind == "images" else 1
    stem = f"{_FILE_PREFIX[split]}-{kind}-idx{ndim}-ubyte"
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}.gz not found under {root}. Install the Debian package with "
        "`apt-get update && apt-get install -y dataset-fashion-mnist` (files go to "
        f"{DEFAULT_ROOT}), or pass root= pointing at a folder holding the IDX files."
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into a uint8 array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != _IDX_DTYPE_UBYTE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header shape {shape} does not match {payload.size} stored bytes")
    return payload.reshape(shape)


def load_fashion_mnist(split: Split, root: str | Path = DEFAULT_ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split: images uint8 ``(N, 28, 28)`` (0 = black background) and labels int64 ``(N,)`` in [0, 10).

    N is 60,000 for ``"train"`` and 10,000 for ``"test"``.
    """
    root = Path(root)
    images = read_idx(_idx_path(root, split, "images"))
    labels = read_idx(_idx_path(root, split, "labels"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"inconsistent Fashion-MNIST files under {root}: {images.shape} vs {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def pad_to_rgb32(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> uint8 ``(N, 3, 32, 32)``: 2 px of zero padding per side, grayscale replicated."""
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD), value=0)
    return padded.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def fashion_mnist_uint8(split: Split, root: str | Path = DEFAULT_ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """One split in the metrics format: uint8 ``(N, 3, 32, 32)`` and int64 labels ``(N,)``."""
    images, labels = load_fashion_mnist(split, root)
    return pad_to_rgb32(images), labels


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST as model images: ``(float32 (3, 32, 32) in [-1, 1], int label)``.

    The whole split is held in memory as uint8 ``(N, 32, 32)`` (about 60 MB for train); conversion to float happens
    per item.
    """

    def __init__(self, split: Split = "train", root: str | Path = DEFAULT_ROOT) -> None:
        images, self.labels = load_fashion_mnist(split, root)
        self.split = split
        self.images = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD), value=0)
        self.classes = FASHION_MNIST_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = uint8_to_model_images(self.images[i]).unsqueeze(0).expand(3, -1, -1)
        return image.contiguous(), int(self.labels[i])
