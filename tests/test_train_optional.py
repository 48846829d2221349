"""The core runs without torch; onnxfib.train says how to install it when torch is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_core_and_cli_import_without_torch() -> None:
    done = _run("import onnxfib, onnxfib.cli\nassert 'onnxfib.train' not in sys.modules\nprint('ok')")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.slow
def test_train_without_torch_names_the_extra() -> None:
    done = _run("import onnxfib.train")
    assert done.returncode != 0
    assert "ImportError" in done.stderr and "onnxfib[train]" in done.stderr
