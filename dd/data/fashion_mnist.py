"""Fashion-MNIST: where dd finds the IDX files, how it obtains them, and the 32x32 RGB view the models see.

Where the files are looked for (the first folder holding all four wins, :func:`find_root`):

1. ``/usr/share/datasets/fashion-mnist``, from the Debian package ``dataset-fashion-mnist``;
2. ``$DD_FMNIST_DIR/FashionMNIST/raw`` (default ``~/.cache/dd/fashion-mnist/FashionMNIST/raw``), where
   :func:`ensure_fashion_mnist` downloads them through torchvision's ``FashionMNIST(download=True)``, from
   ``$DD_FMNIST_MIRROR`` (a URL of a folder holding the four ``.gz`` files, ``file://`` included) when set.

``python -m dd.data.get_fashion_mnist`` does the same from a shell (``make test`` and ``make demo`` call it); with
neither the package nor a reachable download it fails with one line that names both ways.

The tiny tokenizer, teacher and the FID classifier all see Fashion-MNIST as 32x32 RGB: the 28x28 grayscale images
are zero-padded by 2 px on each side (black, the dataset's background colour) and replicated to 3 channels.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import socket
import struct
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dd.data.image_folder import uint8_to_model_images

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CACHE_ENV = "DD_FMNIST_DIR"
MIRROR_ENV = "DD_FMNIST_MIRROR"
DEFAULT_CACHE = Path("~/.cache/dd/fashion-mnist")
#: md5 of each file's *decompressed* content. The gzip wrappers differ between the original release (whose md5s
#: torchvision pins) and Debian's 2020 repack, but the IDX bytes inside are the same; checking them accepts either
#: source and checks what dd actually reads.
CONTENT_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
HOW_TO_GET = (f"install the Debian package (sudo apt-get install -y {DEBIAN_PACKAGE}) or let dd download it "
              f"(python -m dd.data.get_fashion_mnist; needs network access, or {MIRROR_ENV}=<URL of a folder "
              f"holding the four .gz files>)")
#: seconds a download may wait on a silent connection (torchvision's urlopen has no timeout of its own)
DOWNLOAD_TIMEOUT_S = 60.0


class FashionMNISTUnavailable(FileNotFoundError):
    """Neither the Debian package nor a download could provide Fashion-MNIST; the message names both ways."""


def cache_dir() -> Path:
    """Where downloads go: ``$DD_FMNIST_DIR``, else ``~/.cache/dd/fashion-mnist``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def download_folder(cache: Path | None = None) -> Path:
    """The folder of the downloaded IDX files: torchvision's ``FashionMNIST(root=cache)`` keeps the ``.gz`` files
    and their extracted copies in ``<cache>/FashionMNIST/raw``."""
    return (cache if cache is not None else cache_dir()) / "FashionMNIST" / "raw"


def has_fashion_mnist(root: Path) -> bool:
    """Whether ``root`` holds all four IDX files (gzip-compressed or not)."""
    return all((root / f"{stem}.gz").is_file() or (root / stem).is_file() for stem in CONTENT_MD5)


def find_root(debian_root: Path | None = None, cache: Path | None = None) -> Path | None:
    """The first folder holding the four files: the Debian package's, then the download cache; None if neither."""
    for root in (debian_root if debian_root is not None else DEBIAN_ROOT, download_folder(cache)):
        if has_fashion_mnist(root):
            return root
    return None


def default_root() -> Path:
    """The folder loaders read when given no ``root``: where the files are, else the Debian folder (the error for
    missing files then says how to get them)."""
    return find_root() or DEBIAN_ROOT


#: Where the files were when dd was imported. Loaders called without ``root`` look again, so a download made later
#: in the same process is found.
DEFAULT_ROOT = default_root()

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
    raise FileNotFoundError(f"Fashion-MNIST file {stem}.gz not found under {root}: {HOW_TO_GET}, or pass root= "
                            f"pointing at a folder holding the IDX files.")


def _read_bytes(path: Path) -> bytes:
    """A file's bytes, decompressed when its name ends in ``.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        return handle.read()


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into a uint8 array of its stored shape."""
    data = _read_bytes(path)
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != _IDX_DTYPE_UBYTE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header shape {shape} does not match {payload.size} stored bytes")
    return payload.reshape(shape)


def load_fashion_mnist(split: Split, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split: images uint8 ``(N, 28, 28)`` (0 = black background) and labels int64 ``(N,)`` in [0, 10).

    N is 60,000 for ``"train"`` and 10,000 for ``"test"``. ``root=None`` reads :func:`default_root`.
    """
    root = Path(root) if root is not None else default_root()
    images = read_idx(_idx_path(root, split, "images"))
    labels = read_idx(_idx_path(root, split, "labels"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"inconsistent Fashion-MNIST files under {root}: {images.shape} vs {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def pad_to_rgb32(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> uint8 ``(N, 3, 32, 32)``: 2 px of zero padding per side, grayscale replicated."""
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD), value=0)
    return padded.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def fashion_mnist_uint8(split: Split, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One split in the metrics format: uint8 ``(N, 3, 32, 32)`` and int64 labels ``(N,)``."""
    images, labels = load_fashion_mnist(split, root)
    return pad_to_rgb32(images), labels


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST as model images: ``(float32 (3, 32, 32) in [-1, 1], int label)``.

    The whole split is held in memory as uint8 ``(N, 32, 32)`` (about 60 MB for train); conversion to float happens
    per item.
    """

    def __init__(self, split: Split = "train", root: str | Path | None = None) -> None:
        images, self.labels = load_fashion_mnist(split, root)
        self.split = split
        self.images = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD), value=0)
        self.classes = FASHION_MNIST_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = uint8_to_model_images(self.images[i]).unsqueeze(0).expand(3, -1, -1)
        return image.contiguous(), int(self.labels[i])


# -- obtaining the files ---------------------------------------------------------------------------------------------
def ensure_fashion_mnist(cache: Path | None = None, mirror: str | None = None,
                         debian_root: Path | None = None) -> Path:
    """The folder holding Fashion-MNIST's four IDX files, downloading them first when no folder has them.

    Order: the Debian package's folder, the download cache (``cache``, default :func:`cache_dir`), then a download
    into the cache through torchvision from ``mirror`` (default ``$DD_FMNIST_MIRROR``, else torchvision's own
    mirrors), checked against :data:`CONTENT_MD5`. Raises :class:`FashionMNISTUnavailable` with a one-line message
    naming both ways when the download fails.
    """
    cache = cache if cache is not None else cache_dir()
    found = find_root(debian_root, cache)
    if found is not None:
        return found
    return download_fashion_mnist(cache, mirror or os.environ.get(MIRROR_ENV) or None)


def download_fashion_mnist(cache: Path, mirror: str | None = None) -> Path:
    """Download the four files into :func:`download_folder` ``(cache)`` and verify their content; returns that folder.

    ``mirror``: a URL of a folder holding the four ``.gz`` files (torchvision's ``FashionMNIST(download=True)``
    fetches from it), a ``file://`` URL or a local folder (copied), or None for torchvision's own mirrors. A failed
    download leaves no partial file behind.
    """
    from torchvision.datasets import FashionMNIST

    target = download_folder(cache)
    local = _local_folder(mirror)
    try:
        if local is not None:
            _copy_from_folder(local, target)
        else:
            _torchvision_download(cache, [mirror] if mirror else list(FashionMNIST.mirrors))
        verify_content(target)
    except Exception as err:  # torchvision and urllib raise many classes; each ends in the same one line
        _remove_idx_files(target)
        raise FashionMNISTUnavailable(
            f"Fashion-MNIST not found in {DEBIAN_ROOT} or {target}, and getting it from "
            f"{mirror or ', '.join(FashionMNIST.mirrors)} failed ({_cause(err)}). To get it, {HOW_TO_GET}.") from err
    return target


def _torchvision_download(cache: Path, mirrors: list[str]) -> None:
    """``FashionMNIST(cache, download=True)`` from ``mirrors``, into ``<cache>/FashionMNIST/raw``."""
    from torchvision.datasets import FashionMNIST

    # A same-named subclass (torchvision names the download folder after the class) carries the mirrors, so the
    # torchvision class itself is never modified. md5=None: torchvision pins the original gzip files, while a mirror
    # of Debian's repack holds the same data in other gzip bytes; verify_content checks the data instead.
    source = type("FashionMNIST", (FashionMNIST,), {
        "mirrors": [m.rstrip("/") + "/" for m in mirrors],
        "resources": [(f"{stem}.gz", None) for stem in CONTENT_MD5]})
    with _download_timeout(DOWNLOAD_TIMEOUT_S), contextlib.redirect_stdout(io.StringIO()):
        source(str(cache), train=False, download=True)


def _local_folder(mirror: str | None) -> Path | None:
    """The folder a ``file://`` URL or a plain path names; None for network URLs. torchvision's downloader cannot
    read ``file://`` (it asks the response for a length that file responses lack), so dd copies those itself."""
    if not mirror:
        return None
    if mirror.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(mirror).path))
    return None if "://" in mirror else Path(mirror).expanduser()


def _copy_from_folder(folder: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for stem in CONTENT_MD5:
        shutil.copyfile(folder / f"{stem}.gz", target / f"{stem}.gz")


def _remove_idx_files(folder: Path) -> None:
    """Remove the four files and their extracted copies: a partial file would otherwise pass for a download."""
    for stem in CONTENT_MD5:
        for path in (folder / stem, folder / f"{stem}.gz"):
            path.unlink(missing_ok=True)


def verify_content(root: Path) -> None:
    """Check each IDX file's decompressed bytes against :data:`CONTENT_MD5`; raises ValueError on a mismatch."""
    for stem, expected in CONTENT_MD5.items():
        path = root / f"{stem}.gz" if (root / f"{stem}.gz").is_file() else root / stem
        digest = hashlib.md5(_read_bytes(path), usedforsecurity=False).hexdigest()
        if digest != expected:
            raise ValueError(f"{path.name} is not the Fashion-MNIST release (md5 of its content {digest}, "
                             f"expected {expected})")


@contextlib.contextmanager
def _download_timeout(seconds: float) -> Iterator[None]:
    """A socket timeout for the download only, so a silently dropped connection fails instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _cause(err: BaseException) -> str:
    """One line for an error: torchvision's span several (one per mirror) and the last one holds the cause."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"
