"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (no network).

The package installs the four gzipped IDX files of the original release under
``/usr/share/datasets/fashion-mnist/``; ``apt-get install -y dataset-fashion-mnist`` provides
them. ``FASHION_MNIST_DIR`` points elsewhere. The IDX format: a big-endian header (two zero
bytes, a type code, 0x08 for unsigned bytes, the number of dimensions) followed by one
big-endian uint32 per dimension and the raw data.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def data_dir() -> Path:
    """Where the IDX files are looked for (``$FASHION_MNIST_DIR`` or the Debian location)."""
    return Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))


def available() -> bool:
    """True when all four files are present."""
    root = data_dir()
    return all((root / name).is_file() for pair in _FILES.values() for name in pair)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The uint8 array stored in a (gzipped) IDX file; ValueError on any other content."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes), file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of ``split`` ('train': 60000, 'test': 10000): images uint8
    ``(n, 28, 28)``, labels uint8 in 0..9. FileNotFoundError names the package to install."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = data_dir()
    image_file, label_file = (root / name for name in _FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: install the Debian package "
                "(apt-get install -y dataset-fashion-mnist) or set FASHION_MNIST_DIR"
            )
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels
