"""One compression run: bind rules to the graph, color it, group tied channels, collapse.

The passes, in order (docs/architecture.md explains each):
1. bind: every node with a rule becomes a site with channel ports; the rest are barriers;
2. freeze reasons: graph inputs and outputs, tensors next to barriers, pinned ports;
3. forward: fibers (Eq. 3) in topological order; backward: opfibers (Eq. 5) in reverse;
4. shrink groups (groups.py): channels tied by the sites' links, and per group the partition
   to collapse along: the meet of its members' fibers (or covers) and the sites' constraints;
5. collapse: every site rewrites its constants (Eq. 10 with the scale rule); export.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import xxhash

from .coloring import Budgeted, Coloring, Tolerance, TreeCache
from .errors import UsageError
from .graph import GraphView
from .partition import Partition
from .groups import ShrinkGroup, build_groups
from .io import Storage
from .report import Barrier, LayerReport
from .rules import Declined, Plan, Port, Registry, Site, default_registry
from .rules.linear import LinearSite

SYMMETRIES = ("fiber", "cover")


@dataclass(frozen=True)
class MemberFigures:
    """The partitions of one tensor's channels that its group implies."""

    fibers: Partition
    opfibers: Partition
    covers: Partition
    collapse: Partition
    frozen: str | None


@dataclass(frozen=True)
class Cut:
    """A layer's eps given by a count of merges: the eps at which its rows make ``merges``
    merges, cut from its own merge distances when the forward pass reaches it (they move when
    the layers before it merge). A layer that clusters more than once (``Site.clusters_once``
    False: a recurrence clusters until its hidden colors are stable, per direction) has no one
    tree to cut and runs at ``eps``, which the caller cuts from the distances it has. The
    layers in ``partners`` (tied to it, later in the graph) take the eps it settles on."""

    merges: int
    eps: float
    partners: tuple[str, ...] = ()


@dataclass(frozen=True)
class SiteForward:
    """What one site's forward pass wrote: the fibers of its outputs (tensor name -> coloring),
    the merge distances its clustering recorded (None where it recorded none), and the eps it
    ran at (settled by its clustering where its layer was given a :class:`Cut`)."""

    fibers: tuple[tuple[str, Coloring], ...]
    heights: np.ndarray | None
    eps: float


class ForwardMemo:
    """Each site's forward pass (:class:`SiteForward`) by what it reads: the site's place and
    name, its tolerance and chosen colors, and its inputs' fibers. For the many analyses of one
    model (a search): the model's weights are not part of the key, so one memo serves one model,
    and a search step that changes one layer's eps re-clusters only what that change reaches.
    Holds at most ``budget`` bytes, dropping the least recently used."""

    def __init__(self, budget: int = 256 << 20) -> None:
        self._done: Budgeted[SiteForward] = Budgeted(budget)

    @staticmethod
    def key(index: int, site: Site, tol: Tolerance, recording: bool, fibers: Sequence[Coloring]) -> bytes:
        digest = xxhash.xxh3_128()
        chosen = tol.chosen
        for coloring in fibers:
            digest.update(b"f%d|" % len(coloring))
            digest.update(np.ascontiguousarray(coloring.partition.labels).data)
            digest.update(np.ascontiguousarray(coloring.scales, dtype=np.float64).data)
        if chosen is not None:
            partition = chosen.partition if isinstance(chosen, Coloring) else chosen
            digest.update(b"c%d|" % len(partition))
            digest.update(np.ascontiguousarray(partition.labels).data)
            if isinstance(chosen, Coloring):
                digest.update(np.ascontiguousarray(chosen.scales, dtype=np.float64).data)
        return b"%d|%s|%s|%d|" % (index, site.name.encode(), tol.key.encode(), recording) + digest.digest()

    def __len__(self) -> int:
        return len(self._done)

    def get(self, key: bytes) -> SiteForward | None:
        return self._done.get(key)

    def put(self, key: bytes, done: SiteForward) -> None:
        for _, coloring in done.fibers:  # shared by every analysis that reads it again
            coloring.partition.labels.setflags(write=False)
            coloring.scales.setflags(write=False)
        nbytes = sum(c.partition.labels.nbytes + c.scales.nbytes for _, c in done.fibers)
        self._done.put(key, done, nbytes + (0 if done.heights is None else done.heights.nbytes))


class Analysis:
    """The state of one run over one model (no globals): sites, colorings, groups, plans.

    ``eps`` is the tolerance of every layer that ``layer_eps`` (layer name -> eps, the names of
    ``layers``) and ``layer_cuts`` (layer name -> :class:`Cut`: its eps settled by a count of
    merges) do not name; a site that is not a layer uses the tolerance of the site producing
    its first input. ``layers`` report the eps each layer ran at. With ``record_heights`` each
    layer's merge distances are kept in ``heights`` (layer name -> sorted cosine distances at
    which its rows would merge), but for layers whose outputs are all frozen (no search steps
    them: their rows are clustered without the tree).
    ``layer_colorings`` imposes a layer's output coloring (layer name -> coloring of its output
    channels, or a partition whose scales are fitted to the rows: ``coloring.fitted_scales``)
    instead of clustering its rows: merges chosen from calibration data or by folding. ``trees``
    keeps the clustering trees between runs over the same model (a search's many analyses), and
    ``prepared`` is the preprocessed graph of an untouched ``GraphView`` of it, copied instead of
    preprocessing the model again. ``barriers`` lists the nodes reading a channel axis that no
    rule binds, each with its rule's reason. ``storage`` reads a model whose external data was
    not loaded from disk (``GraphView``). With ``figures`` False (a search's many analyses, which
    need only the collapse) the fibers, opfibers and covers of each tensor are not worked out,
    and with the fiber symmetry, whose collapse does not read opfibers, the backward pass is
    skipped: ``figures`` is then empty, and ``layers`` carry None for them. ``forwards`` gives
    the forward pass of a site that read the same before (``ForwardMemo``: one per model)."""

    def __init__(self, model: onnx.ModelProto, *, eps: float, symmetry: str = "fiber",
                 registry: Registry | None = None, layer_eps: Mapping[str, float] | None = None,
                 record_heights: bool = False, layer_colorings: Mapping[str, Coloring | Partition] | None = None,
                 trees: TreeCache | None = None, prepared: gs.Graph | None = None,
                 storage: Storage | None = None, figures: bool = True, forwards: ForwardMemo | None = None,
                 layer_cuts: Mapping[str, Cut] | None = None) -> None:
        if symmetry not in SYMMETRIES:
            raise ValueError(f"symmetry must be one of {SYMMETRIES}, got {symmetry!r}")
        self.graph = GraphView(model, prepared=prepared, storage=storage)
        self.tol = Tolerance(float(eps))
        self.symmetry = symmetry
        self.with_figures = figures
        self.heights: dict[str, np.ndarray] = {}
        self._fibers: dict[str, Coloring] = {}
        self._opfiber_parts: dict[str, list[Partition]] = defaultdict(list)
        self._opfibers: dict[str, Partition] = {}
        self._plans: dict[str, Plan] = {}
        self._collapsed: onnx.ModelProto | None = None
        self.sites, self.barriers = bind(self.graph, registry or default_registry())
        self._ports = self._ports_by_tensor()
        self._expanding: dict[str, Port] = {}  # graph outputs that narrow and are re-expanded
        self._freeze = self._freeze_reasons()
        self._check_layer_names([*(layer_eps or {}), *(layer_cuts or {}),
                                 *(p for cut in (layer_cuts or {}).values() for p in cut.partners)])
        self.layer_eps: dict[int, float] = {}  # the eps each site ran at, by id(site)
        self._written: list[tuple[str, Coloring]] | None = None  # the fibers set by the site running
        of_tensor: dict[str, float] = {}  # the eps of the site producing each tensor
        of_layer: dict[str, float] = {}  # the eps of each layer run
        for index, site in enumerate(self.sites):
            site_eps, merges = self._site_eps(site, float(eps), layer_eps or {}, layer_cuts or {}, of_tensor, of_layer)
            frozen = all(port.name in self._freeze for port in site.outputs)  # no search steps it
            recording = site.layer and (merges is not None or (record_heights and not frozen))
            self.tol = Tolerance(site_eps, [] if recording else None, (layer_colorings or {}).get(site.name), trees,
                                 merges)
            done = self._forward(index, site, forwards)
            self._fibers.update(done.fibers)
            if done.heights is not None and record_heights:
                self.heights[site.name] = done.heights
            self.layer_eps[id(site)] = done.eps
            of_tensor.update((p.name, done.eps) for p in site.outputs)
            if site.layer:
                of_layer[site.name] = done.eps
        tolerances = {id(site): Tolerance(self.layer_eps[id(site)], trees=trees) for site in self.sites}
        for site in reversed(self.sites) if figures or symmetry == "cover" else ():
            for port in site.outputs:
                self._settle_opfiber(port)
            self.tol = tolerances[id(site)]
            site.backward(self)
            self.graph.release()
        self.tol = Tolerance(float(eps))
        self._freeze.update((n, "is not colored") for n in self._ports if n not in self._fibers)
        self._constraints: dict[str, list[np.ndarray]] = defaultdict(list)
        self._blocks: dict[str, set[int]] = defaultdict(set)
        for site in self.sites:  # a tensor may be constrained by its producer and its readers
            for name, labels in site.constraints(self).items():
                self._constraints[name].append(labels)
            for name, size in site.blocks().items():
                self._blocks[name].add(size)
        port_of = {name: uses[0][1] for name, uses in self._ports.items()}
        links = [link for site in self.sites for link in site.links()]
        self.groups = build_groups(port_of, links, self._freeze)
        self.figures: dict[str, MemberFigures] = {}
        self._collapses: dict[str, tuple[Partition, str | None]] = {}  # tensor -> its collapse, why frozen
        for group in self.groups:
            self._decide(group)
        self.layers = self._layer_reports()

    # -- the context sites read and write -------------------------------------------------
    def fiber(self, port: Port) -> Coloring:
        coloring = self._fibers.get(port.name)
        return coloring if coloring is not None and len(coloring) == port.width else Coloring.discrete(port.width)

    def set_fiber(self, port: Port, coloring: Coloring) -> None:
        self._fibers[port.name] = coloring
        if self._written is not None:
            self._written.append((port.name, coloring))

    def opfiber(self, port: Port) -> Partition:
        return self._settle_opfiber(port)

    def add_opfiber(self, port: Port, partition: Partition) -> None:
        if len(partition) == port.width:
            self._opfiber_parts[port.name].append(partition)

    def plan(self, port: Port) -> Plan | None:
        return self._plans.get(port.name)

    def rescale(self, port: Port, factors: np.ndarray) -> None:
        self._producer(port).rescale(self, port, factors)

    def can_rescale(self, port: Port) -> bool:
        producer = self._producer(port)
        return producer is not None and producer.can_rescale(self, port)

    def _producer(self, port: Port) -> Site | None:
        return next((site for site, p in self._ports.get(port.name, ()) if p in site.outputs), None)

    # -- passes -----------------------------------------------------------------------------
    def _forward(self, index: int, site: Site, forwards: ForwardMemo | None) -> SiteForward:
        """The forward pass of ``site`` (the ``index``-th) at ``self.tol``, from ``forwards`` when
        it read the same there before."""
        if forwards is None:
            return self._run_forward(site)
        key = ForwardMemo.key(index, site, self.tol, self.tol.heights is not None,
                              [self.fiber(port) for port in site.inputs])
        done = forwards.get(key)
        if done is None:
            done = self._run_forward(site)
            forwards.put(key, done)
        return done

    def _run_forward(self, site: Site) -> SiteForward:
        self._written = []
        site.forward(self)
        self.graph.release()
        self.tol.settle(np.empty(0))  # a layer cut by merges that clustered no two rows makes none
        done = SiteForward(tuple(self._written), self.tol.heights[-1] if self.tol.heights else None, self.tol.eps)
        self._written = None
        return done

    def _check_layer_names(self, names: Sequence[str]) -> None:
        layers = {site.name for site in self.sites if site.layer}
        unknown = sorted(set(names) - layers)
        if unknown:
            raise UsageError(f"per-layer eps names unknown layer(s) {unknown}; the layers are {sorted(layers)}")

    @staticmethod
    def _site_eps(site: Site, eps: float, layer_eps: Mapping[str, float], layer_cuts: Mapping[str, Cut],
                  of_tensor: Mapping[str, float], of_layer: Mapping[str, float]) -> tuple[float, int | None]:
        """The eps ``site`` runs at, and the merges to settle it by (NaN and a count for a layer
        given a :class:`Cut` that clusters once, else the cut's eps). A layer's eps is the one
        its head settled on when it is a cut's partner, else its ``layer_eps`` or ``eps``; any
        other site's that of the site producing its first input (``eps`` when none does)."""
        if not site.layer:
            return next((of_tensor[p.name] for p in site.inputs[:1] if p.name in of_tensor), eps), None
        if site.name in layer_cuts:
            cut = layer_cuts[site.name]
            return (math.nan, cut.merges) if site.clusters_once else (cut.eps, None)
        head = next((name for name, cut in layer_cuts.items() if site.name in cut.partners), None)
        if head is None:
            return layer_eps.get(site.name, eps), None
        if head not in of_layer:
            raise ValueError(f"layer {site.name!r} is cut as a partner of {head!r}, which comes after it")
        return of_layer[head], None

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
        holder = {id(inner): node for node in self.graph.graph.nodes
                  for subgraph in node.subgraphs(recursive=True) for inner in subgraph.nodes}
        for name, uses in self._ports.items():
            tensor: gs.Variable = uses[0][1].tensor
            reason = self.graph.is_boundary(tensor)
            if reason == "graph output" and self._expandable(tensor, uses):
                self._expanding[name] = uses[0][1]
                reason = None
            if len({(p.axis, p.width) for _, p in uses}) > 1:
                reason = reason or "its channel axis is read two ways"
            producer = tensor.inputs[0] if tensor.inputs else None
            if producer is not None and id(producer) not in site_of:
                reason = reason or f"comes from {_named(producer)}"
            for consumer in tensor.outputs:
                site = site_of.get(id(consumer))
                if site is None or all(p.name != name for p in site.inputs):
                    reason = reason or f"feeds {_named(consumer, holder.get(id(consumer)))}"
            if reason:
                reasons[name] = reason
        for site in self.sites:
            for name, reason in site.pinned().items():
                reasons.setdefault(name, reason)
        for name in reasons:
            self._expanding.pop(name, None)
        return reasons

    def _expandable(self, tensor: gs.Variable, uses: list[tuple[Site, Port]]) -> bool:
        """Whether a graph output may narrow and be re-expanded (``GraphView.expand_output``):
        a floating-point tensor whose producer allows it (``Site.expands_output``)."""
        producer = self._producer(uses[0][1])
        if producer is None or not producer.expands_output:
            return False
        try:
            floating = tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating)
        except TypeError:
            floating = False
        return floating and tensor.name not in self.graph.input_names

    def _settle_opfiber(self, port: Port) -> Partition:
        """Opfibers of a tensor: the meet over its consumers (discrete at the model's edge)."""
        if port.name not in self._opfibers:
            parts = list(self._opfiber_parts.get(port.name, []))
            if not parts or port.name in self._freeze:
                parts.append(Partition.discrete(port.width))
            self._opfibers[port.name] = parts[0].meet(*parts[1:])
        return self._opfibers[port.name]

    def _decide(self, group: ShrinkGroup) -> None:
        """The collapse of every member (and its figures, unless the analysis skips them), and a
        plan for each when the group's collapse merges anything."""
        fibers = {n: self.fiber(m.port).partition.labels for n, m in group.members.items()}
        opfibers = ({n: self.opfiber(m.port).labels for n, m in group.members.items()}
                    if self.with_figures or self.symmetry == "cover" else {})
        chosen = (fibers,) if self.symmetry == "fiber" else (fibers, opfibers)
        required = {
            n: Partition.from_rows(np.column_stack(self._constraints[n])).labels if n in self._constraints
            else np.zeros(len(m.classes), dtype=np.int64)
            for n, m in group.members.items()
        }
        collapse = group.base_partition(*chosen, required, honor_frozen=True)
        blocked = [(n, size) for n in group.members for size in sorted(self._blocks.get(n, ()))]
        while blocked:  # equalising one block structure may unbalance another: repeat until stable
            before = collapse
            for name, size in blocked:
                collapse = group.equal_blocks(name, size, collapse)
            if collapse == before:
                break
        if self.with_figures:
            base_fibers = group.base_partition(fibers, honor_frozen=False)
            base_opfibers = group.base_partition(opfibers, honor_frozen=False)
        for name in group.members:
            member_collapse = group.induced(name, collapse)
            self._collapses[name] = (member_collapse, group.frozen_reason(name))
            if self.with_figures:
                induced_fibers, induced_opfibers = group.induced(name, base_fibers), group.induced(name, base_opfibers)
                self.figures[name] = MemberFigures(induced_fibers, induced_opfibers,
                                                   induced_fibers.meet(induced_opfibers), *self._collapses[name])
            if not collapse.is_discrete:
                scales = self.fiber(group.members[name].port).relative_scales(member_collapse)
                self._plans[name] = Plan(member_collapse, scales)

    def _layer_reports(self) -> list[LayerReport]:
        reports = []
        for site in self.sites:
            if not site.layer:
                continue
            inp, out = site.inputs[0], site.outputs[0]
            collapse, frozen = self._collapses[out.name]
            figures = self.figures.get(out.name)
            width_in = self._collapses[inp.name][0].n_colors if inp.name in self._collapses else inp.width
            width_out = collapse.n_colors
            reports.append(LayerReport(
                name=site.name,
                op_type=site.op_type,
                tensor=out.name,
                width=out.width,
                fibers=None if figures is None else figures.fibers.n_colors,
                opfibers=None if figures is None else figures.opfibers.n_colors,
                covers=None if figures is None else figures.covers.n_colors,
                largest_fiber=None if figures is None else int(figures.fibers.sizes().max()) if out.width else 0,
                width_after=width_out,
                params=site.parameters(inp.width, out.width),
                params_after=site.parameters(width_in, width_out),
                frozen=frozen,
                blocks=out.width // min(self._blocks[out.name]) if out.name in self._blocks else 1,
                eps=self.layer_eps[id(site)],
                nonfinite=site.nonfinite_channels() if isinstance(site, LinearSite) else 0,
            ))
            self.graph.release()  # the weights' pages the finiteness check read
        return reports

    # -- output -----------------------------------------------------------------------------
    def collapse(self) -> onnx.ModelProto:
        """The model collapsed to its base (a new ModelProto; metadata and checks are the caller's)."""
        if self._collapsed is None:
            for site in self.sites:
                site.rewrite(self)
                self.graph.release()
            for name, port in self._expanding.items():
                plan = self._plans.get(name)
                if plan is not None and not plan.partition.is_discrete:  # unit scales: LayerNorm's
                    self.graph.expand_output(port.tensor, plan.partition.labels, port.axis)
            for name in self._plans:
                self.graph.forget_shape(self._ports[name][0][1].tensor)
            self._collapsed = self.graph.export(unchanged=not self._plans)
        collapsed = onnx.ModelProto()
        collapsed.CopyFrom(self._collapsed)
        return collapsed


def bind(graph: GraphView, registry: Registry) -> tuple[list[Site], list[Barrier]]:
    """The bind pass: each node in topological order becomes part of the site its rule binds
    (a site may claim nodes after its own, but not a node another site holds), or a barrier.
    Returns the sites in order, and the barriers that read a channel axis bound before them (the
    others stand outside the channel graph: shape arithmetic, barriers' successors) and that no
    later site claims (attention claims the head splits before it)."""
    sites: list[Site] = []
    declined: list[tuple[gs.Node, str]] = []
    known: dict[str, Port] = {}
    covered: set[int] = set()
    for node in graph.nodes:
        if id(node) in covered:
            continue
        site = registry.bind(node, graph, known)
        if isinstance(site, Site) and any(id(n) in covered for n in site.nodes):
            site = Declined(f"its {type(site).__name__} would claim a node another site holds")
        if isinstance(site, Declined):
            if any(t.name in known for t in node.inputs):
                declined.append((node, site.reason))
            continue
        sites.append(site)
        covered.update(id(n) for n in site.nodes)
        known.update((p.name, p) for p in site.outputs)
    barriers = [Barrier(node.name or node.outputs[0].name, node.op, node.domain or "", reason)
                for node, reason in declined if id(node) not in covered]
    return sites, barriers


def _named(node: gs.Node, holder: gs.Node | None = None) -> str:
    """``node`` as a reason names it: its op and name, and the If, Loop or Scan of the main graph
    whose subgraph holds it (``holder``)."""
    text = f"{node.op} '{node.name}'" if node.name else f"an unnamed {node.op}"
    return text if holder is None else f"{text} in a subgraph of {_named(holder)}"


def analyze(model: onnx.ModelProto, *, eps: float, symmetry: str = "fiber",
            registry: Registry | None = None, layer_eps: Mapping[str, float] | None = None,
            record_heights: bool = False, layer_colorings: Mapping[str, Coloring | Partition] | None = None,
            trees: TreeCache | None = None, prepared: gs.Graph | None = None,
            storage: Storage | None = None, figures: bool = True, forwards: ForwardMemo | None = None,
            layer_cuts: Mapping[str, Cut] | None = None) -> Analysis:
    """Analyse ``model`` (external data loaded, or on disk at ``storage``) at tolerance ``eps``
    (``layer_eps`` and ``layer_cuts`` per layer); see :class:`Analysis`."""
    return Analysis(model, eps=eps, symmetry=symmetry, registry=registry, layer_eps=layer_eps,
                    record_heights=record_heights, layer_colorings=layer_colorings, trees=trees, prepared=prepared,
                    storage=storage, figures=figures, forwards=forwards, layer_cuts=layer_cuts)


__all__ = ["Analysis", "Cut", "ForwardMemo", "MemberFigures", "SiteForward", "SYMMETRIES", "analyze", "bind"]
