"""onnxfib: compress ONNX models by merging neurons that share a fibration symmetry."""

from onnxfib._version import __version__
from onnxfib.api import CompressionResult, barriers, compress, inspect, inspection, sweep, validate
from onnxfib.errors import (
    InternalError,
    InvalidModelError,
    OnnxfibError,
    UsageError,
    ValidationMismatchError,
)
from onnxfib.viewer import view

__all__ = [
    "CompressionResult",
    "InternalError",
    "InvalidModelError",
    "OnnxfibError",
    "UsageError",
    "ValidationMismatchError",
    "__version__",
    "barriers",
    "compress",
    "inspect",
    "inspection",
    "sweep",
    "validate",
    "view",
]
