"""One compression run: bind rules to the graph, color it, group coupled axes, collapse.

The passes, in order (docs/architecture.md explains each):
1. bind: every node with a rule becomes a site with channel ports; the rest are barriers;
2. shrink groups: ports coupled by element-wise sites form groups, frozen when a member is a
   graph input or output, feeds or comes from a barrier, or disagrees on its channel axis;
3. forward: fibers (Eq. 3) in topological order; backward: opfibers (Eq. 5) in reverse;
4. decide: each unfrozen group collapses along the meet of its members' fibers (or covers);
5. collapse: every site rewrites its constants (Eq. 10 with the scale rule); export.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from .coloring import Coloring, Tolerance
from .graph import GraphView
from .partition import Partition
from .report import LayerReport
from .rules import Plan, Port, Registry, Site, default_registry
from .rules.linear import LinearSite

SYMMETRIES = ("fiber", "cover")


@dataclass(frozen=True)
class Group:
    """Tensors whose channel axes narrow together, and what the analysis found for them."""

    members: tuple[str, ...]
    width: int
    frozen: str | None
    fibers: Partition
    opfibers: Partition

    @property
    def covers(self) -> Partition:
        return self.fibers.meet(self.opfibers)


class Analysis:
    """The state of one run over one model (no globals): sites, colorings, groups, plans."""

    def __init__(self, model: onnx.ModelProto, *, eps: float, symmetry: str = "fiber",
                 registry: Registry | None = None) -> None:
        if symmetry not in SYMMETRIES:
            raise ValueError(f"symmetry must be one of {SYMMETRIES}, got {symmetry!r}")
        self.graph = GraphView(model)
        self.tol = Tolerance(float(eps))
        self.symmetry = symmetry
        self._fibers: dict[str, Coloring] = {}
        self._opfiber_parts: dict[str, list[Partition]] = defaultdict(list)
        self._opfibers: dict[str, Partition] = {}
        self._plans: dict[str, Plan] = {}
        self._collapsed: onnx.ModelProto | None = None
        self.sites = self._bind(registry or default_registry())
        self._ports = self._ports_by_tensor()
        self._freeze = self._freeze_reasons()
        for site in self.sites:
            site.forward(self)
        for site in reversed(self.sites):
            for port in site.outputs:
                self._settle_opfiber(port)
            site.backward(self)
        self.groups = self._groups()
        self._decide()
        self.layers = self._layer_reports()

    # -- the context sites read and write -------------------------------------------------
    def fiber(self, port: Port) -> Coloring:
        coloring = self._fibers.get(port.name)
        return coloring if coloring is not None and len(coloring) == port.width else Coloring.discrete(port.width)

    def set_fiber(self, port: Port, coloring: Coloring) -> None:
        self._fibers[port.name] = coloring

    def opfiber(self, port: Port) -> Partition:
        return self._settle_opfiber(port)

    def add_opfiber(self, port: Port, partition: Partition) -> None:
        if len(partition) == port.width:
            self._opfiber_parts[port.name].append(partition)

    def plan(self, port: Port) -> Plan | None:
        return self._plans.get(port.name)

    # -- passes -----------------------------------------------------------------------------
    def _bind(self, registry: Registry) -> list[Site]:
        sites: list[Site] = []
        known: dict[str, Port] = {}
        covered: set[int] = set()
        for node in self.graph.nodes:
            if id(node) in covered:
                continue
            rule = registry.lookup(node)
            site = rule(node, self.graph, known) if rule else None
            if site is None:
                continue
            sites.append(site)
            covered.update(id(n) for n in site.nodes)
            known.update((p.name, p) for p in site.outputs)
        return sites

    def _ports_by_tensor(self) -> dict[str, list[tuple[Site, Port]]]:
        ports: dict[str, list[tuple[Site, Port]]] = defaultdict(list)
        for site in self.sites:
            for port in (*site.inputs, *site.outputs):
                ports[port.name].append((site, port))
        return ports

    def _freeze_reasons(self) -> dict[str, str]:
        """Why a tensor's channel axis may not narrow, for every tensor that may not."""
        reasons: dict[str, str] = {}
        site_of = {id(n): site for site in self.sites for n in site.nodes}
        for name, uses in self._ports.items():
            tensor: gs.Variable = uses[0][1].tensor
            reason = self.graph.is_boundary(tensor)
            if len({(p.axis, p.width) for _, p in uses}) > 1:
                reason = reason or "its channel axis is read two ways"
            producer = tensor.inputs[0] if tensor.inputs else None
            if producer is not None and id(producer) not in site_of:
                reason = reason or f"comes from {producer.op} '{producer.name}'"
            for consumer in tensor.outputs:
                site = site_of.get(id(consumer))
                if site is None or all(p.name != name for p in site.inputs):
                    reason = reason or f"feeds {consumer.op} '{consumer.name}'"
            if reason:
                reasons[name] = reason
        return reasons

    def _settle_opfiber(self, port: Port) -> Partition:
        """Opfibers of a tensor: the meet over its consumers (discrete at the model's edge)."""
        if port.name not in self._opfibers:
            parts = list(self._opfiber_parts.get(port.name, []))
            if not parts or port.name in self._freeze:
                parts.append(Partition.discrete(port.width))
            self._opfibers[port.name] = parts[0].meet(*parts[1:])
        return self._opfibers[port.name]

    def _groups(self) -> list[Group]:
        parent = {name: name for name in self._ports}

        def root(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        for site in self.sites:
            if site.coupled:
                names = [p.name for p in (*site.inputs, *site.outputs)]
                for other in names[1:]:
                    parent[root(other)] = root(names[0])
        members: dict[str, list[str]] = defaultdict(list)
        for name in self._ports:
            members[root(name)].append(name)
        return [self._group(tuple(names)) for names in members.values()]

    def _group(self, names: tuple[str, ...]) -> Group:
        ports = [self._ports[name][0][1] for name in names]
        widths = {p.width for p in ports}
        frozen = next((f"'{n}' {self._freeze[n]}" for n in names if n in self._freeze), None)
        if len(widths) > 1:
            width = max(widths)
            frozen = frozen or "its members disagree on the channel count"
            return Group(names, width, frozen, Partition.discrete(width), Partition.discrete(width))
        if frozen is None and any(n not in self._fibers for n in names):
            frozen = "a member is not colored"
        fibers = self.fiber(ports[0]).partition.meet(*(self.fiber(p).partition for p in ports[1:]))
        opfibers = self.opfiber(ports[0]).meet(*(self.opfiber(p) for p in ports[1:]))
        return Group(names, widths.pop(), frozen, fibers, opfibers)

    def _decide(self) -> None:
        for group in self.groups:
            if group.frozen:
                continue
            partition = group.fibers if self.symmetry == "fiber" else group.covers
            if partition.is_discrete:
                continue
            for name in group.members:
                self._plans[name] = Plan(partition, self._fibers[name].relative_scales(partition))

    def _group_of(self) -> dict[str, Group]:
        return {name: group for group in self.groups for name in group.members}

    def _layer_reports(self) -> list[LayerReport]:
        group_of = self._group_of()
        reports = []
        for site in self.sites:
            if not isinstance(site, LinearSite):
                continue
            inp, out = site.inputs[0], site.outputs[0]
            group = group_of[out.name]
            plan_in, plan_out = self._plans.get(inp.name), self._plans.get(out.name)
            width_in = plan_in.partition.n_colors if plan_in else inp.width
            width_out = plan_out.partition.n_colors if plan_out else out.width
            reports.append(LayerReport(
                name=site.name,
                op_type=site.op_type,
                tensor=out.name,
                width=out.width,
                fibers=group.fibers.n_colors,
                opfibers=group.opfibers.n_colors,
                covers=group.covers.n_colors,
                largest_fiber=int(group.fibers.sizes().max()) if out.width else 0,
                width_after=width_out,
                params=site.parameters(inp.width, out.width),
                params_after=site.parameters(width_in, width_out),
                frozen=group.frozen,
            ))
        return reports

    # -- output -----------------------------------------------------------------------------
    def collapse(self) -> onnx.ModelProto:
        """The model collapsed to its base (a new ModelProto; metadata and checks are the caller's)."""
        if self._collapsed is None:
            for site in self.sites:
                site.rewrite(self)
            for name in self._plans:
                self.graph.forget_shape(self._ports[name][0][1].tensor)
            self._collapsed = self.graph.export()
        collapsed = onnx.ModelProto()
        collapsed.CopyFrom(self._collapsed)
        return collapsed


def analyze(model: onnx.ModelProto, *, eps: float, symmetry: str = "fiber",
            registry: Registry | None = None) -> Analysis:
    """Analyse ``model`` (external data loaded) at tolerance ``eps``; see :class:`Analysis`."""
    return Analysis(model, eps=eps, symmetry=symmetry, registry=registry)


__all__ = ["Analysis", "Group", "SYMMETRIES", "analyze"]
