"""matplotlib, an optional dependency (the ``plot`` extra), imported only when a plot is drawn."""

from __future__ import annotations

from types import ModuleType

from onnxfib.errors import UsageError

INSTALL_HINT = 'pip install "onnxfib[plot]"'


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend; a UsageError naming the extra when matplotlib is missing."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":  # matplotlib is there but one of its own imports failed
            raise
        raise UsageError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt
