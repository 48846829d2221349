"""The installed package version (``0.1.0`` when running from an uninstalled checkout)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("onnxfib")
except PackageNotFoundError:  # pragma: no cover - source tree without installation
    __version__ = "0.1.0"
