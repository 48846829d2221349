"""Plain data returned by the library: per-layer symmetry figures and whole-run reports."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


@dataclass(frozen=True)
class LayerReport:
    """Symmetry figures of one linear layer (a Gemm/MatMul producer) and its collapse.

    ``width`` counts the layer's output channels; ``fibers``/``opfibers``/``covers`` count the
    colors of each partition of those channels (None from an analysis without figures, as a
    target search's intermediate ones); ``width_after`` is the width the collapse keeps
    (equal to ``width`` when ``frozen`` names why the channels may not shrink); ``params`` and
    ``params_after`` count the scalars in the layer's weight and bias before and after;
    ``blocks`` > 1 says the output is cut into that many blocks of equal width (attention
    heads, convolution groups, RNN directions); ``eps`` is the tolerance its rows merged at;
    ``nonfinite`` counts output channels whose weights or bias hold NaN or infinities (never
    merged).
    """

    name: str
    op_type: str
    tensor: str
    width: int
    fibers: int | None
    opfibers: int | None
    covers: int | None
    largest_fiber: int | None
    width_after: int
    params: int
    params_after: int
    frozen: str | None = None
    blocks: int = 1
    eps: float = 0.0
    nonfinite: int = 0

    @property
    def note(self) -> str:
        """Why the layer keeps channels, in words: frozen, or channels that cannot merge."""
        notes = [self.frozen] if self.frozen else []
        if self.nonfinite:
            notes.append(f"{self.nonfinite} channel(s) hold NaN or infinity, never merged")
        return "; ".join(notes)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Barrier:
    """A node that reads a tensor with a channel axis but that no rule binds, and why (the
    reason its rule declined, or that its op has no rule): its neighbours keep their widths."""

    name: str
    op_type: str
    domain: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OutputError:
    """Largest absolute and relative difference seen on one model output, and the tolerances it
    was judged by (given, or the defaults of the output's dtype)."""

    name: str
    max_abs: float
    max_rel: float
    ok: bool
    rtol: float | None = None
    atol: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ValidationReport:
    """Per-output errors of a candidate model against a reference, over all input batches;
    ``rtol``/``atol`` are the tolerances given, None where each output's dtype chose them."""

    outputs: list[OutputError]
    rtol: float | None
    atol: float | None
    batches: int
    samples: int = 0  # inputs compared: rows of the batches' shared first axis (1 per batch
    # without one)
    mode: str = "full"  # "full": whole ONNX Runtime sessions; "layers": one layer at a time

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "rtol": self.rtol,
            "atol": self.atol,
            "batches": self.batches,
            "samples": self.samples,
            "mode": self.mode,
            "outputs": [o.to_dict() for o in self.outputs],
        }


@dataclass(frozen=True)
class RefitReport:
    """One layer refit on calibration data: its calibration error (root mean square over the
    pre-activations it is fitted to) with the merged weights it started from, and after."""

    name: str
    rms_before: float
    rms_after: float

    def to_dict(self) -> dict:
        return asdict(self)


class TargetKind(str, Enum):
    """What a target bounds; the value names it in reports and metadata. ``params``: the
    fraction of parameters kept; ``error``: the largest output error relative to the output's
    largest magnitude; ``drop``: the accuracy lost (a fraction: 0.01 is one point);
    ``agreement``: the share of predictions equal to the original's (its integer label output,
    or the argmax over the last axis of its first output, per position); ``cosine``: the mean
    cosine of output rows with the original's (the smallest over float outputs)."""

    PARAMS = "params"
    ERROR = "error"
    DROP = "drop"
    AGREEMENT = "agreement"
    COSINE = "cosine"

    @property
    def lower_bound(self) -> bool:
        """Whether the limit is the least figure allowed (else the most)."""
        return self in (TargetKind.AGREEMENT, TargetKind.COSINE)

    def describe(self, achieved: float, limit: float) -> str:
        """'<achieved>, asked at most <limit>' (at least, for a lower bound) in the kind's terms."""
        figure, number = {
            TargetKind.PARAMS: ("keeps {} of the parameters", "{:.2%}"),
            TargetKind.ERROR: ("max output error {} of the output's scale", "{:.3g}"),
            TargetKind.DROP: ("accuracy drop {}", "{:.2%}"),
            TargetKind.AGREEMENT: ("agrees with the original on {} of the answers", "{:.2%}"),
            TargetKind.COSINE: ("mean output cosine {}", "{:.4f}"),
        }[self]
        bound = "at least" if self.lower_bound else "at most"
        return f"{figure.format(number.format(achieved))}, asked {bound} {number.format(limit)}"


@dataclass(frozen=True)
class TargetReport:
    """A compression target and what the result measured on the data it was searched on:
    ``limit`` bounds the figure of ``kind`` (:class:`TargetKind`), ``achieved`` is that figure
    for the result, and ``met`` whether it is within the limit. ``max_abs``, ``max_rel``,
    ``agreement`` and ``cosine`` are the result's figures whatever the kind; the accuracies are
    set when labels were given."""

    kind: TargetKind
    limit: float
    achieved: float
    max_abs: float
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    max_rel: float | None = None
    agreement: float | None = None
    cosine: float | None = None

    @property
    def met(self) -> bool:
        return self.achieved >= self.limit if self.kind.lower_bound else self.achieved <= self.limit

    def describe(self) -> str:
        """What the result achieved against the limit, in a phrase (:meth:`TargetKind.describe`)."""
        return self.kind.describe(self.achieved, self.limit)

    def to_dict(self) -> dict:
        return {**asdict(self), "kind": self.kind.value, "met": self.met}


@dataclass(frozen=True)
class SweepPoint:
    """One uniform eps of a sweep: parameters kept and the output error (and accuracy) it costs."""

    eps: float
    params: int
    params_kept: float
    max_abs: float
    rms: float
    accuracy: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CompressionReport:
    """Everything a compression run measured; the CLI's table and ``--report`` JSON show this."""

    eps: float
    symmetry: str
    params_before: int
    params_after: int
    nodes_before: int
    nodes_after: int
    layers: list[LayerReport]
    seconds: float
    bytes_before: int | None = None
    bytes_after: int | None = None
    validation: ValidationReport | None = None
    target: TargetReport | None = None
    calibrated: bool = False
    refit: list[RefitReport] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    ops_before: dict[str, int] = field(default_factory=dict)  # nodes per op type
    ops_after: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "eps": self.eps,
            "symmetry": self.symmetry,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "seconds": self.seconds,
            "layers": [layer.to_dict() for layer in self.layers],
            "validation": self.validation.to_dict() if self.validation else None,
            "target": self.target.to_dict() if self.target else None,
            "calibrated": self.calibrated,
            "refit": [r.to_dict() for r in self.refit],
            **self.extra,
        }


def to_json(value: Any, indent: int | None = 2) -> str:
    """``value`` (what the reports' ``to_dict`` give) as strict JSON (RFC 8259, which has no NaN
    or infinity): non-finite floats are written as the strings "NaN", "Infinity" and "-Infinity",
    which JavaScript's ``Number()`` and Python's ``float()`` read back."""
    return json.dumps(_finite(value), indent=indent, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
