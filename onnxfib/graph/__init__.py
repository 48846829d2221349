"""A mutable view of an ONNX model's main graph, built on onnx-graphsurgeon.

It resolves constant weights (initializers and Constant nodes alike), answers shape questions
from ONNX shape inference, and writes rewritten weights back without disturbing tensors that
other nodes share. Nothing here knows about colorings.

- :mod:`.view`: :class:`GraphView` (queries and safe rewrites) and :class:`Given`;
- :mod:`.passes`: the preprocessing every view runs, as a named list of passes;
- :mod:`.restore`: shape inference, and what graphsurgeon's export drops put back.
"""

from .passes import PREPARATION, Pass, ort_log_severity
from .restore import outer_names
from .view import SPILL_BYTES, SPILL_FILE, Given, GraphView

__all__ = ["PREPARATION", "SPILL_BYTES", "SPILL_FILE", "Given", "GraphView", "Pass", "outer_names",
           "ort_log_severity"]
