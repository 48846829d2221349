"""The per-op rule registry: binding functions per ONNX op type (DESIGN §4).

A registry is an ordinary value built by :func:`default_registry`; nothing is registered at
import time, so a run can use its own set of rules. Each module registers the ops of one family;
an op whose nodes take several forms (Reshape: a fold into features, a regrouping of leading
axes, the end of an attention block) may have alternative rules in other modules, tried in
registration order.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..graph import GraphView
from . import (
    attention,
    axes,
    conv,
    elementwise,
    gather,
    linear,
    normalization,
    pooling,
    recurrent,
    reshape,
    segments,
)
from .base import UNTRACKED, Context, Declined, Plan, Port, Rule, Site

_DEFAULT_DOMAINS = (None, "", "ai.onnx")


def _domain(domain: str | None) -> str:
    return "" if domain in _DEFAULT_DOMAINS else str(domain)


class Registry:
    """Maps (domain, op type) to the rules that bind such nodes."""

    def __init__(self) -> None:
        self._rules: dict[tuple[str, str], list[Rule]] = {}

    def register(self, op_type: str, rule: Rule, domain: str = "", *,
                 alternative: bool = False) -> None:
        """Add ``rule`` for ``op_type`` in ``domain``.

        Args:
            op_type: the ONNX op type, e.g. ``"Reshape"``.
            rule: the binding function (see :class:`~onnxfib.rules.base.Rule`).
            domain: the op's domain; "" (or "ai.onnx") for the default domain.
            alternative: whether ``rule`` is tried after the op's earlier rules decline;
                without it a second rule for the same op is refused (ValueError).
        """
        rules = self._rules.setdefault((_domain(domain), op_type), [])
        if rules and not alternative or rule in rules:
            raise ValueError(f"a rule for {domain or 'ai.onnx'}::{op_type} is already registered")
        rules.append(rule)

    def bind(self, node: gs.Node, graph: GraphView, known: dict[str, Port]) -> Site | Declined:
        """The site the first of ``node``'s rules that accepts it binds, or why it is a barrier:
        the reason its op's first rule gave, or that no rule is registered for its op.

        Args:
            node: the node to bind.
            graph: the model being analysed.
            known: each activation already bound, mapped to its port.

        Returns:
            The site, or :class:`Declined` naming the reason.
        """
        rules = self._rules.get((_domain(node.domain), node.op))
        if not rules:
            return Declined(f"no rule for {node.domain or 'ai.onnx'} {node.op}")
        first: Declined | None = None
        for rule in rules:
            bound = rule(node, graph, known)
            if isinstance(bound, Site):
                return bound
            first = first or bound
        return first or Declined(f"{node.op} of a form its rule does not bind")

    def op_types(self) -> list[tuple[str, str]]:
        """(domain, op type) of every registered rule, sorted."""
        return sorted(self._rules)


def default_registry() -> Registry:
    """A registry holding every rule onnxfib ships."""
    registry = Registry()
    for family in (linear, elementwise, conv, pooling, reshape, segments, axes, attention,
                   normalization, gather, recurrent):
        family.register(registry)
    return registry


__all__ = ["UNTRACKED", "Context", "Declined", "Plan", "Port", "Registry", "Rule", "Site",
           "default_registry"]
