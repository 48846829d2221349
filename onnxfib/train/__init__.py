"""Training-side tools (PyTorch): watch fibers, opfibers and covers form, check the theorems on
real code, break symmetries to keep a network plastic, and collapse while training.

Needs the ``train`` extra (``pip install onnxfib[train]``); the core never imports this package.
All the mathematics (signatures, clustering, Eq. 10, the scale rule) is the core's: models are
exported to ONNX in memory and analysed by :class:`onnxfib.analysis.Analysis`.
"""

try:
    import torch  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError("onnxfib.train needs PyTorch: pip install 'onnxfib[train]'") from error

from .adapter import Layer, TorchAnalysis, Unit, export_onnx, parameter_count
from .breaking import Broken, SymmetryBreaker, break_covers
from .collapse import (
    CollapseRetrainResult,
    EarlyStopping,
    FeedForwardLayers,
    Layers,
    OnnxLayers,
    Round,
    collapse_retrain,
    collapse_to_base,
    greedy_thresholds,
)
from .continual_backprop import ContinualBackprop
from .plasticity import L2Init, ShrinkPerturb, effective_rank, unit_activity
from .probes import activity_partition, layer_outputs, synchronized, synchronized_blocks
from .tracker import CoverTracker, LayerRecord

__all__ = [
    "Broken",
    "CollapseRetrainResult",
    "ContinualBackprop",
    "CoverTracker",
    "EarlyStopping",
    "FeedForwardLayers",
    "L2Init",
    "Layer",
    "LayerRecord",
    "Layers",
    "OnnxLayers",
    "Round",
    "ShrinkPerturb",
    "SymmetryBreaker",
    "TorchAnalysis",
    "Unit",
    "activity_partition",
    "break_covers",
    "collapse_retrain",
    "collapse_to_base",
    "effective_rank",
    "export_onnx",
    "greedy_thresholds",
    "layer_outputs",
    "parameter_count",
    "synchronized",
    "synchronized_blocks",
    "unit_activity",
]
