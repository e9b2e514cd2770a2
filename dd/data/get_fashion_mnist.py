"""``python -m dd.data.get_fashion_mnist [--check] [--cache DIR] [--mirror URL]``: find or download Fashion-MNIST.

Prints the folder holding the four IDX files (the Debian package's, or the download cache after downloading into
it; see :mod:`dd.data.fashion_mnist`) and exits 0. When the files cannot be had it prints one line naming both ways
to get them and exits 1. ``make test`` and ``make demo`` run it before anything else.

A module of its own (not ``python -m dd.data.fashion_mnist``): ``dd.data`` imports ``fashion_mnist`` at package
import, and running an already imported module with ``-m`` makes Python print a warning.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dd.data.fashion_mnist import (
    CACHE_ENV,
    DEFAULT_CACHE,
    HOW_TO_GET,
    MIRROR_ENV,
    FashionMNISTUnavailable,
    ensure_fashion_mnist,
    find_root,
)

PROG = "dd.data.get_fashion_mnist"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only look for the files; never download")
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"download folder (default ${CACHE_ENV}, else {DEFAULT_CACHE})")
    parser.add_argument("--mirror", default=None,
                        help=f"URL of a folder holding the four .gz files (default ${MIRROR_ENV}, else torchvision's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 with the folder on stdout, or 1 with one line on stderr."""
    args = _parser().parse_args(argv)
    if args.check:
        root = find_root(cache=args.cache)
        if root is None:
            print(f"{PROG}: Fashion-MNIST not found; {HOW_TO_GET}", file=sys.stderr)
            return 1
    else:
        try:
            root = ensure_fashion_mnist(args.cache, args.mirror)
        except FashionMNISTUnavailable as err:
            print(f"{PROG}: {err}", file=sys.stderr)
            return 1
    print(f"Fashion-MNIST: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
