"""The per-op rule registry: one binding function per ONNX op type (DESIGN §4).

A registry is an ordinary value built by :func:`default_registry`; nothing is registered at
import time, so a run can use its own set of rules.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from . import conv, elementwise, gather, layout, linear, normalization, recurrent
from .base import Context, Plan, Port, Rule, Site

_DEFAULT_DOMAINS = (None, "", "ai.onnx")


class Registry:
    """Maps (domain, op type) to the rule that binds such nodes."""

    def __init__(self) -> None:
        self._rules: dict[tuple[str, str], Rule] = {}

    def register(self, op_type: str, rule: Rule, domain: str = "") -> None:
        """Add a rule; a second rule for the same op is refused."""
        key = ("" if domain in _DEFAULT_DOMAINS else domain, op_type)
        if key in self._rules:
            raise ValueError(f"a rule for {domain or 'ai.onnx'}::{op_type} is already registered")
        self._rules[key] = rule

    def lookup(self, node: gs.Node) -> Rule | None:
        """The rule for ``node``, or None when its op is a barrier."""
        domain = "" if node.domain in _DEFAULT_DOMAINS else node.domain
        return self._rules.get((domain, node.op))

    def op_types(self) -> list[tuple[str, str]]:
        """(domain, op type) of every registered rule, sorted."""
        return sorted(self._rules)


def default_registry() -> Registry:
    """A registry holding every rule onnxfib ships."""
    registry = Registry()
    linear.register(registry)
    elementwise.register(registry)
    conv.register(registry)
    layout.register(registry)
    normalization.register(registry)
    gather.register(registry)
    recurrent.register(registry)
    return registry


__all__ = ["Context", "Plan", "Port", "Registry", "Rule", "Site", "default_registry"]
