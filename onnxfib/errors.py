"""Exception hierarchy: every failure of the library raises an OnnxfibError subclass."""

from __future__ import annotations


class OnnxfibError(Exception):
    """Base class of every error onnxfib raises on purpose."""

    exit_code = 2


class InvalidModelError(OnnxfibError):
    """The input is not a readable, valid ONNX model (missing, corrupt, fails the checker)."""


class UsageError(OnnxfibError):
    """An argument is out of range or malformed (eps, input shapes, data, paths)."""


class InternalError(OnnxfibError):
    """A bug in onnxfib: it produced something invalid (the CLI exits 3)."""

    exit_code = 3


class ValidationMismatchError(OnnxfibError):
    """The compressed model's outputs differ from the original's beyond tolerance."""

    exit_code = 1

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report
