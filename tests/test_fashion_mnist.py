"""The Fashion-MNIST loader used by the benchmarks (benchmarks/fashion_mnist.py)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "fashion_mnist.py"
_spec = importlib.util.spec_from_file_location("fashion_mnist", _PATH)
fashion_mnist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fashion_mnist)

needs_data = pytest.mark.skipif(
    not fashion_mnist.available(),
    reason=f"Fashion-MNIST not found in {fashion_mnist.data_dir()} "
    "(apt-get install -y dataset-fashion-mnist, or set FASHION_MNIST_DIR)",
)


@needs_data
@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_split_sizes_and_labels(split: str, count: int) -> None:
    images, labels = fashion_mnist.load(split)
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (count,) and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == set(range(10))
    # the release is balanced: 6000 / 1000 images per class
    assert np.bincount(labels, minlength=10).tolist() == [count // 10] * 10
    assert 0 < images.mean() < 255 and images.max() == 255


def test_read_idx_roundtrip_and_bad_header(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + np.array(data.shape, dtype=">u4").tobytes()
    good = tmp_path / "x-idx3-ubyte.gz"
    good.write_bytes(gzip.compress(header + data.tobytes()))
    np.testing.assert_array_equal(fashion_mnist.read_idx(good), data)
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(header + data.tobytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        fashion_mnist.read_idx(short)
    wrong = tmp_path / "float-idx3-ubyte"
    wrong.write_bytes(bytes([0, 0, 0x0D, 1]) + np.array([1], dtype=">u4").tobytes() + b"\0\0\0\0")
    with pytest.raises(ValueError, match="unsigned-byte"):
        fashion_mnist.read_idx(wrong)


def test_missing_files_name_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    assert not fashion_mnist.available()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist.load("test")
