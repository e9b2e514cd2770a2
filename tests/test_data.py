"""Fashion-MNIST IDX loading, the padded 32x32 dataset, and the image-folder dataset."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dd.data.fashion_mnist import (
    DEFAULT_ROOT,
    FASHION_MNIST_CLASSES,
    FashionMNISTDataset,
    fashion_mnist_uint8,
    load_fashion_mnist,
    read_idx,
)
from dd.data.image_folder import (
    UNLABELLED,
    ImageFolderDataset,
    load_image_folder_uint8,
    model_images_to_uint8,
    uint8_to_model_images,
)

from conftest import needs_fmnist


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@needs_fmnist
@pytest.mark.parametrize(("split", "count"), [("train", 60_000), ("test", 10_000)])
def test_load_fashion_mnist_shapes_dtypes_and_balance(split: str, count: int) -> None:
    images, labels = load_fashion_mnist(split)
    assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [count // 10] * 10
    assert images.max() == 255 and images.min() == 0
    # Background is black: corners are almost always zero, the image mean is far from it.
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]].float()
    assert corners.mean() < 2 < 50 < images.float().mean()


def test_missing_files_error_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", root=tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize("compress", [True, False])
def test_custom_root_and_idx_parser(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8) % 10
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    loaded_images, loaded_labels = load_fashion_mnist("test", root=tmp_path)
    assert np.array_equal(loaded_images.numpy(), images)
    assert loaded_labels.tolist() == labels.tolist()


def test_idx_parser_rejects_bad_files(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad.idx"
    bad_magic.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        read_idx(bad_magic)
    truncated = tmp_path / "short.idx"
    truncated.write_bytes(struct.pack(">HBBI", 0, 8, 1, 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="does not match"):
        read_idx(truncated)


@needs_fmnist
def test_dataset_items_are_padded_rgb_in_minus_one_one() -> None:
    dataset = FashionMNISTDataset("test")
    assert len(dataset) == 10_000 and len(FASHION_MNIST_CLASSES) == 10
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    batch = torch.stack([dataset[i][0] for i in range(200)])
    assert batch.min() == -1.0 and batch.max() == 1.0
    border = torch.cat([batch[..., :2, :].flatten(), batch[..., -2:, :].flatten(),
                        batch[..., :, :2].flatten(), batch[..., :, -2:].flatten()])
    assert torch.all(border == -1.0), "2 px padding must be black"
    assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 0], batch[:, 2])


@needs_fmnist
def test_uint8_view_matches_dataset() -> None:
    images, labels = fashion_mnist_uint8("test")
    assert images.shape == (10_000, 3, 32, 32) and images.dtype == torch.uint8
    dataset = FashionMNISTDataset("test")
    for i in (0, 1234, 9999):
        image, label = dataset[i]
        assert torch.equal(model_images_to_uint8(image), images[i]) and label == labels[i]


def test_pixel_convention_round_trip() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, -1, -1)
    model = uint8_to_model_images(pixels)
    assert model.min() == -1.0 and model.max() == 1.0
    assert torch.equal(model_images_to_uint8(model), pixels)
    assert torch.equal(model_images_to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))
    with pytest.raises(TypeError):
        uint8_to_model_images(model)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_with_class_subfolders(tmp_path: Path) -> None:
    white_gray = np.full((20, 30), 255, dtype=np.uint8)  # grayscale, non-square
    red = np.zeros((40, 40, 3), dtype=np.uint8)
    red[..., 0] = 255
    _save(tmp_path / "shirt" / "a.png", white_gray)
    _save(tmp_path / "bag" / "nested" / "b.jpg", red)
    _save(tmp_path / "loose.png", np.zeros((8, 8), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")

    dataset = ImageFolderDataset(tmp_path, size=16)
    assert dataset.class_names == ["bag", "shirt"] and len(dataset) == 3
    items = {path.name: dataset[i] for i, path in enumerate(dataset.files)}
    white, white_label = items["a.png"]
    assert white.shape == (3, 16, 16) and white.dtype == torch.float32
    assert torch.allclose(white, torch.ones_like(white)) and white_label == 1
    red_image, red_label = items["b.jpg"]
    assert red_label == 0 and red_image[0].mean() > 0.9 and red_image[1].mean() < -0.9
    assert items["loose.png"][1] == UNLABELLED and torch.all(items["loose.png"][0] == -1.0)

    images, labels = load_image_folder_uint8(tmp_path, size=16)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert sorted(labels.tolist()) == [-1, 0, 1]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderDataset(tmp_path / "missing", size=8)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path, size=8)
