"""Obtaining Fashion-MNIST without the Debian package: real downloads from local mirrors (these machines have no
network), content verification, and the one-line message when neither way works."""

from __future__ import annotations

import contextlib
import functools
import gzip
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import dd.data.fashion_mnist as fmnist
from dd.data.get_fashion_mnist import main as get_main

from conftest import needs_fmnist

#: where this machine has the real files (looked up before any test pretends the Debian package is missing)
SOURCE = fmnist.find_root()


@pytest.fixture
def no_debian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pretend the Debian package is not installed; downloads go to a fresh cache. Returns the cache folder."""
    monkeypatch.setattr(fmnist, "DEBIAN_ROOT", tmp_path / "no-debian-package")
    cache = tmp_path / "cache"
    monkeypatch.setenv(fmnist.CACHE_ENV, str(cache))
    monkeypatch.delenv(fmnist.MIRROR_ENV, raising=False)
    return cache


@pytest.fixture
def real_mirror(tmp_path: Path) -> Path:
    """A folder holding the four real .gz files, copied from wherever this machine has them."""
    source = SOURCE
    if source is None or not all((source / f"{stem}.gz").is_file() for stem in fmnist.CONTENT_MD5):
        pytest.skip("no Fashion-MNIST .gz files on this machine to build a mirror from")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for stem in fmnist.CONTENT_MD5:
        shutil.copyfile(source / f"{stem}.gz", mirror / f"{stem}.gz")
    return mirror


@contextlib.contextmanager
def http_mirror(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on localhost; yields its URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


def _closed_port() -> int:
    """A localhost port nothing listens on: connecting fails at once, as offline."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _fake_mirror(folder: Path) -> Path:
    """Four well-formed IDX .gz files that are not Fashion-MNIST."""
    folder.mkdir()
    for stem in fmnist.CONTENT_MD5:
        shape = (3, 28, 28) if "images" in stem else (3,)
        header = struct.pack(">HBB", 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
        with gzip.open(folder / f"{stem}.gz", "wb") as handle:
            handle.write(header + bytes(int(np.prod(shape))))
    return folder


def _assert_loads_test_split(root: Path | None) -> None:
    images, labels = fmnist.load_fashion_mnist("test", root)
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * 10


@needs_fmnist
def test_download_through_torchvision_from_an_http_mirror(no_debian: Path, real_mirror: Path) -> None:
    assert fmnist.find_root() is None
    with http_mirror(real_mirror) as url:
        root = fmnist.ensure_fashion_mnist(mirror=url)
    assert root == fmnist.download_folder(no_debian) == no_debian / "FashionMNIST" / "raw"
    fmnist.verify_content(root)
    # the loaders find the download without being told where it is
    assert fmnist.find_root() == root and fmnist.default_root() == root
    _assert_loads_test_split(None)


@needs_fmnist
def test_file_mirror_from_the_environment_and_no_second_download(no_debian: Path, real_mirror: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fmnist.MIRROR_ENV, real_mirror.resolve().as_uri())
    root = fmnist.ensure_fashion_mnist()
    assert root == no_debian / "FashionMNIST" / "raw"
    _assert_loads_test_split(root)
    shutil.rmtree(real_mirror)  # found in the cache now: the mirror is not read again
    assert fmnist.ensure_fashion_mnist() == root


def test_debian_folder_comes_first(tmp_path: Path, no_debian: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = _fake_mirror(tmp_path / "debian")
    cache_files = _fake_mirror(tmp_path / "cached")
    shutil.copytree(cache_files, fmnist.download_folder(no_debian))
    monkeypatch.setattr(fmnist, "DEBIAN_ROOT", debian)
    assert fmnist.ensure_fashion_mnist(mirror="http://127.0.0.1:9/never-asked/") == debian
    monkeypatch.setattr(fmnist, "DEBIAN_ROOT", tmp_path / "gone")
    assert fmnist.ensure_fashion_mnist(mirror="http://127.0.0.1:9/never-asked/") == fmnist.download_folder(no_debian)


def test_wrong_content_is_refused_and_removed(tmp_path: Path, no_debian: Path) -> None:
    mirror = _fake_mirror(tmp_path / "fake")
    with http_mirror(mirror) as url, pytest.raises(fmnist.FashionMNISTUnavailable, match="not the Fashion-MNIST"):
        fmnist.ensure_fashion_mnist(mirror=url)
    assert not any(fmnist.download_folder(no_debian).iterdir()), "a refused download must leave nothing behind"
    assert fmnist.find_root() is None


def test_offline_without_the_package_is_one_line_naming_both_ways(no_debian: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    status = get_main(["--mirror", f"http://127.0.0.1:{_closed_port()}/"])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and err.startswith("dd.data.get_fashion_mnist: ")
    assert "apt-get install -y dataset-fashion-mnist" in err and fmnist.MIRROR_ENV in err
    assert "Traceback" not in err
    assert get_main(["--check"]) == 1
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_missing_files_error_names_both_ways(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        fmnist.load_fashion_mnist("test", root=tmp_path)
    assert "apt-get install -y dataset-fashion-mnist" in str(info.value)
    assert "python -m dd.data.get_fashion_mnist" in str(info.value)
