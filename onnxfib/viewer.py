"""The colored network: the data behind ``onnxfib view``, its HTML page and its static figure.

Nothing here computes symmetries: every figure comes from ``analysis.Analysis`` (the layer
reports ``onnxfib inspect`` prints and the per-tensor ``MemberFigures``), run once per eps of
the page's eps control. The op graph is laid out by Graphviz ``dot`` when it is installed, else
by a simple layered layout (the page says which). matplotlib is imported only for a figure.
"""

from __future__ import annotations

import base64
import colorsys
import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from onnxfib import io
from onnxfib.analysis import SYMMETRIES, Analysis, analyze, bind
from onnxfib.api import check_eps, check_layer_eps
from onnxfib.errors import UsageError
from onnxfib.graph import GraphView
from onnxfib.report import LayerReport
from onnxfib.rules import default_registry
from onnxfib.rules.linear import LinearSite

#: The eps values the page's control offers (the eps asked for is added).
EPS_VALUES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
#: Layers at most this wide have their weights embedded and drawn as edges.
EDGE_LIMIT = 64
#: Edges lighter than this fraction of a layer's largest |weight| are not drawn.
EDGE_FLOOR = 0.05
#: Seconds ``dot`` may take before the layered layout is used instead.
DOT_TIMEOUT = 120.0
#: Version of the JSON structure ``view_data`` returns.
FORMAT = 2
KINDS = ("fibers", "opfibers", "covers", "base")
#: The eps control's stop for per-layer eps (``layer_eps``), in the page's URL and ``stops``.
LAYER_STOP = "per layer"
SINGLETON_COLOR = "#d9d9d9"

_POINTS = 72.0  # dot's unit per inch
_TEMPLATE = "view.html"


def fiber_colors(labels: Sequence[int] | np.ndarray) -> list[str]:
    """A color per channel: channels sharing a color of ``labels`` share one, colors alone in
    their class are light grey, and the others are ranked largest first (then by first channel)
    and take distinct hues. The page's script computes the same colors (``colorsOf``)."""
    array = np.asarray(labels, dtype=np.int64)
    if array.size == 0:
        return []
    sizes = np.bincount(array)
    order = sorted((c for c in range(sizes.size) if sizes[c] > 1), key=lambda c: (-sizes[c], c))
    hue = {c: _hue(rank) for rank, c in enumerate(order)}
    return [hue.get(int(c), SINGLETON_COLOR) for c in array]


def _hue(rank: int) -> str:
    """The ``rank``-th color: hues a golden angle apart, so any number of colors stay distinct."""
    r, g, b = colorsys.hls_to_rgb((rank * 0.381966) % 1.0, 0.5, 0.65)
    return "#" + "".join(f"{round(c * 255):02x}" for c in (r, g, b))


def _eps_values(eps: float, eps_values: Iterable[float]) -> list[float]:
    return sorted({check_eps(e) for e in (*eps_values, eps)})


@dataclass(frozen=True)
class Recorded:
    """What a run of ``onnxfib compress`` used: ``eps`` for the layers ``layer_eps`` does not
    name, the ``symmetry``, ``source`` (the file and run, in words, for the page), and
    ``widths``: each layer's width in the result (the report's ``width_after``, or the
    compressed model's own layers)."""

    eps: float
    layer_eps: dict[str, float]
    symmetry: str
    source: str
    widths: dict[str, int]


def recorded(path: str | os.PathLike) -> Recorded:
    """The settings of the ``onnxfib compress`` run that wrote ``path``: a model (its
    ``onnxfib.*`` metadata_props) or the run's ``--report`` JSON (a file ending in .json).
    UsageError when it cannot be read or records no run. A target search or calibration may
    also have regrouped some layers (folding, selection), which eps alone do not reproduce: the
    source says so."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            report = json.loads(path.read_text(encoding="utf-8"))
            layers, eps, symmetry = report["layers"], report["eps"], report["symmetry"]
            chosen = {layer["name"]: layer["eps"] for layer in layers}
            target, calibrated = report.get("target"), bool(report.get("calibrated"))
            widths = {str(layer["name"]): int(layer["width_after"]) for layer in layers}
        else:
            props = {
                p.key: p.value
                for p in onnx.load(str(path), load_external_data=False).metadata_props
            }
            if "onnxfib.version" not in props:
                raise UsageError(f"{path} records no onnxfib compress run (no onnxfib.* metadata)")
            chosen = json.loads(props.get("onnxfib.layer_eps", "{}"))
            eps, symmetry = props.get("onnxfib.eps", "0.0"), props["onnxfib.symmetry"]
            target = json.loads(props["onnxfib.target"]) if "onnxfib.target" in props else None
            calibrated = props.get("onnxfib.calibrated") == "true"
            with G_LOGGER.suppress(G_LOGGER.CRITICAL + 1):
                sites, _ = bind(GraphView(io.open_model(path).model), default_registry())
            widths = {site.name: site.outputs[0].width for site in sites if site.layer}
        settings = Recorded(
            check_eps(float(eps)),
            check_layer_eps({str(k): float(v) for k, v in dict(chosen).items()}),
            str(symmetry),
            "",
            widths,
        )
    except UsageError:
        raise
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {io.first_line(exc)}") from None
    except (KeyError, TypeError, AttributeError) as exc:  # JSON of another shape
        raise UsageError(
            f"{path} is not a report onnxfib compress wrote (bad or missing {exc})"
        ) from None
    except Exception as exc:  # a corrupt model or JSON
        raise UsageError(
            f"{path} is not a model or report onnxfib compress wrote ({io.first_line(exc)})"
        ) from None
    run = [f"target {target['kind']} {target['limit']:g}"] if target else []
    run += ["calibrated"] if calibrated else []
    caveat = (
        "; layers it regrouped by folding or selection show their eps clustering" if run else ""
    )
    words = f"as compressed in {path.name}" + (f" ({', '.join(run)}{caveat})" if run else "")
    return Recorded(settings.eps, settings.layer_eps, settings.symmetry, words, settings.widths)


def view_data(
    model_or_path: io.ModelSource,
    *,
    eps: float = 0.0,
    eps_values: Iterable[float] = EPS_VALUES,
    layer_eps: Mapping[str, float] | None = None,
    source: str | None = None,
    widths: Mapping[str, int] | None = None,
    symmetry: str = "fiber",
    layout: bool = True,
    base: bool = True,
) -> dict[str, Any]:
    """The data behind the page, JSON-serialisable (the input is never modified):

    - ``format`` (``FORMAT``), ``model`` (the file's name), ``symmetry`` (the base collapsed
      to, as ``compress --symmetry``), ``edge_limit`` and ``edge_floor`` (``EDGE_LIMIT``,
      ``EDGE_FLOOR``);
    - ``eps``: the eps asked for; ``eps_values``: the uniform eps analysed (``eps`` added), the
      first entries of ``analyses``; ``stops``: per entry of ``analyses`` its ``label`` (the eps,
      or ``LAYER_STOP``), ``eps`` and ``layer_eps``; given ``layer_eps`` (layer name -> eps,
      ``eps`` for the others: what ``compress --layer-eps`` or a target search used) it is the
      last stop, with ``source`` saying where it came from and ``widths`` (layer name -> its
      width in that compressed model, as ``Recorded.widths``: the page marks a layer whose
      width there differs, one a search or calibration regrouped), and ``start`` (the stop the
      page opens at) points at it, else at ``eps``;
    - ``layout``: the op graph (``engine`` "dot" or "layered", ``note``, ``width``/``height``,
      ``nodes`` with ``id``, ``op``, ``name``, ``layer`` (its layer's name or null), ``kind``
      ("op", "layer", "input", "output"), box centre ``x``/``y`` and size ``w``/``h`` in points,
      y downwards; ``edges`` with ``from``/``to`` node ids, ``tensor`` and ``points``, a
      polyline, or where ``curve`` is set dot's cubic Bezier control points, then the arrow's tip);
      left out when ``layout`` is False;
    - ``layers``: per analysed layer (``inspect``'s names, in its order) ``name``, ``op_type``,
      ``input`` and ``output`` tensors, ``next`` (layers reading its output channel for
      channel), ``edges`` (|weight| as rows out x columns in, summed over kernel positions and
      scaled to a maximum of 1, when both widths are at most ``EDGE_LIMIT`` and every output
      reads every input: null for wider, grouped or depthwise layers);
    - ``analyses``: per stop, ``eps``, ``layers`` (``LayerReport.to_dict()``,
      what ``inspect --json`` prints), ``tensors``: per layer input and output tensor the
      channel labels of its ``fibers``, ``opfibers``, ``covers`` and ``base`` (the collapse)
      partitions, and its ``frozen`` reason; and ``base``: the index in ``bases`` of the
      collapsed model at this stop, null where nothing merges (the base is the model itself);
    - ``bases`` (left out when ``base`` is False): the distinct collapsed models, each read
      as a model of its own: ``layers`` (per layer of the collapsed graph ``name``, ``op_type``,
      ``input``, ``output``, ``width`` and ``in_width`` and ``edges`` as above, from the base's
      own weights: base channel k is class k of the original's ``base`` labels) and ``layout``
      (its own op graph, as ``layout``; null when ``layout`` is False)."""
    if symmetry not in SYMMETRIES:
        raise UsageError(f"symmetry must be one of {list(SYMMETRIES)}, got {symmetry!r}")
    values = _eps_values(eps, eps_values)
    chosen = check_layer_eps(layer_eps) if layer_eps is not None else None
    stops: list[dict[str, Any]] = [{"label": f"{v:g}", "eps": v, "layer_eps": None} for v in values]
    if chosen is not None:
        stops.append(
            {
                "label": LAYER_STOP,
                "eps": check_eps(eps),
                "layer_eps": chosen,
                "source": source,
                "widths": dict(widths) if widths is not None else None,
            }
        )
    source_model = io.open_model(model_or_path)
    with G_LOGGER.suppress(G_LOGGER.CRITICAL + 1):
        prepared = GraphView(source_model.model).graph
        runs = [
            analyze(
                source_model.model,
                eps=stop["eps"],
                layer_eps=stop["layer_eps"],
                symmetry=symmetry,
                prepared=prepared,
            )
            for stop in stops
        ]
        first = runs[0]
        layer_sites = [site for site in first.sites if site.layer]
        tensors = sorted(
            {p.name for site in layer_sites for p in (site.inputs[0], site.outputs[0])}
        )
        data: dict[str, Any] = {
            "format": FORMAT,
            "model": source_model.path.name if source_model.path else "model",
            "symmetry": symmetry,
            "eps": check_eps(eps),
            "eps_values": values,
            "stops": stops,
            "start": len(stops) - 1 if chosen is not None else values.index(check_eps(eps)),
            "edge_limit": EDGE_LIMIT,
            "edge_floor": EDGE_FLOOR,
            "layers": [_layer(first, site, layer_sites) for site in layer_sites],
            "analyses": [_analysis(run, tensors) for run in runs],
        }
        if layout:  # before any collapse: collapsing rewrites an analysis's graph
            data["layout"] = graph_layout(first.graph.graph, first.sites, first.layers)
        if base:
            data["bases"] = _bases(runs, data["analyses"], tensors, layout)
    return data


def view(
    model_or_path: io.ModelSource,
    *,
    eps: float = 0.0,
    layer_eps: Mapping[str, float] | None = None,
    symmetry: str = "fiber",
    path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The data behind ``onnxfib view``'s page for the model (see :func:`view_data`: a plain,
    JSON-serialisable dict), analysed at ``EPS_VALUES`` and ``eps``, with ``layer_eps`` (layer
    name -> eps, ``eps`` for the rest) as the stop the page opens at; given ``path``, the page is
    also written there, atomically and never over the input."""
    data = view_data(model_or_path, eps=eps, eps_values=(*EPS_VALUES, eps), layer_eps=layer_eps,
                     symmetry=symmetry)
    if path is not None:
        protect = [] if isinstance(model_or_path, onnx.ModelProto) else [model_or_path]
        write_page(data, path, protect=protect)
    return data


def _bases(
    runs: list[Analysis], analyses: list[dict[str, Any]], tensors: list[str], layout: bool
) -> list[dict[str, Any]]:
    """The distinct collapsed models of ``runs`` (see ``view_data``); sets each analysis's
    ``base`` index (null where nothing merges)."""
    bases: list[dict[str, Any]] = []
    seen: dict[bytes, int] = {}
    for run, entry in zip(runs, analyses):
        members = [run.figures[name].collapse for name in tensors if name in run.figures]
        if all(p.is_discrete for p in members):
            entry["base"] = None
            continue
        key = b"|".join(p.labels.astype(np.int64).tobytes() for p in members)
        if key not in seen:
            seen[key] = len(bases)
            bases.append(_base(run.collapse(), run.layers if layout else None))
        entry["base"] = seen[key]
    return bases


def _base(collapsed: onnx.ModelProto, reports: Sequence[LayerReport] | None) -> dict[str, Any]:
    """One collapsed model read as a model of its own (its graph prepared and bound to sites,
    not analysed): its layers' widths and weights, and with ``reports`` (the original's, which
    the page's boxes show) its op graph laid out."""
    graph = GraphView(collapsed)
    bound, _ = bind(graph, default_registry())
    sites: list[Any] = [site for site in bound if site.layer]
    layers = [
        {
            "name": site.name,
            "op_type": site.op_type,
            "input": site.inputs[0].name,
            "output": site.outputs[0].name,
            "width": site.outputs[0].width,
            "in_width": site.inputs[0].width,
            "edges": _edges(site),
        }
        for site in sites
    ]
    laid = graph_layout(graph.graph, bound, reports) if reports is not None else None
    return {"layers": layers, "layout": laid}


def _edges(site: Any) -> list[list[float]] | None:
    """|weight| of a linear layer at most ``EDGE_LIMIT`` wide whose every output reads every
    input, as rows out x columns in summed over kernel positions, scaled to a maximum of 1."""
    inp, out = site.inputs[0], site.outputs[0]
    if not isinstance(site, LinearSite) or max(inp.width, out.width) > EDGE_LIMIT:
        return None
    weights = np.abs(site.matrix()).sum(axis=2)
    top = weights.max(initial=0.0)
    if weights.shape != (out.width, inp.width):  # a grouped or depthwise weight
        return None
    return np.round(weights / top if top > 0 else weights, 3).tolist()


def _layer(analysis: Analysis, site: Any, layer_sites: list[Any]) -> dict[str, Any]:
    """The eps-independent description of one layer (see ``view_data``)."""
    inp, out = site.inputs[0], site.outputs[0]
    group_of = {name: group for group in analysis.groups for name in group.members}

    def tied(a: str, b: str) -> bool:  # b's channels are a's, one for one
        group = group_of.get(a)
        return (
            group is not None
            and b in group.members
            and np.array_equal(group.members[a].classes, group.members[b].classes)
            and not group.members[b].position.any()
        )

    # layers whose input is this output's channels, one for one; not those behind one of them
    # (a depthwise convolution ties its input to its output)
    reading = [
        other for other in layer_sites if other is not site and tied(out.name, other.inputs[0].name)
    ]
    return {
        "name": site.name,
        "op_type": site.op_type,
        "input": inp.name,
        "output": out.name,
        "next": [
            m.name
            for m in reading
            if not any(k is not m and tied(k.outputs[0].name, m.inputs[0].name) for k in reading)
        ],
        "edges": _edges(site),
    }


def _analysis(run: Analysis, tensors: list[str]) -> dict[str, Any]:
    figures = {}
    for name in tensors:
        member = run.figures.get(name)
        if member is None:  # a tensor no group holds keeps its width: every channel alone
            continue
        figures[name] = {
            "fibers": member.fibers.labels.tolist(),
            "opfibers": member.opfibers.labels.tolist(),
            "covers": member.covers.labels.tolist(),
            "base": member.collapse.labels.tolist(),
            "frozen": member.frozen,
        }
    return {
        "eps": run.tol.eps,
        "layers": [layer.to_dict() for layer in run.layers],
        "tensors": figures,
    }


# -- layout ---------------------------------------------------------------------------------


def _graph_nodes(
    graph: gs.Graph, sites: Sequence[Any]
) -> tuple[list[dict[str, Any]], list[tuple[int, int, str]]]:
    """Boxes of the op graph (a layer's nodes are one box, graph inputs and outputs are boxes)
    and the edges between them (from, to, tensor), before layout."""
    box_of: dict[int, int] = {}
    boxes: list[dict[str, Any]] = []

    def add(**box: Any) -> int:
        boxes.append({"id": len(boxes), **box})
        return len(boxes) - 1

    producer: dict[str, int] = {}
    for tensor in graph.inputs:
        producer[tensor.name] = add(op="input", name=tensor.name, layer=None, kind="input")
    layer_of = {id(node): site.name for site in sites if site.layer for node in site.nodes}
    for node in graph.nodes:
        layer = layer_of.get(id(node))
        if layer is not None and any(boxes[b]["layer"] == layer for b in set(box_of.values())):
            box_of[id(node)] = next(b for b in box_of.values() if boxes[b]["layer"] == layer)
        else:
            box_of[id(node)] = add(
                op=node.op,
                name=node.name or node.outputs[0].name,
                layer=layer,
                kind="layer" if layer else "op",
            )
        for tensor in node.outputs:
            producer[tensor.name] = box_of[id(node)]
    edges: dict[tuple[int, int], str] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            start = producer.get(tensor.name)
            if start is not None and start != box_of[id(node)]:
                edges.setdefault((start, box_of[id(node)]), tensor.name)
    for tensor in graph.outputs:
        end = add(op="output", name=tensor.name, layer=None, kind="output")
        if tensor.name in producer:
            edges.setdefault((producer[tensor.name], end), tensor.name)
    return boxes, [(a, b, t) for (a, b), t in edges.items()]


def _label(box: dict[str, Any], report: LayerReport | None) -> str:
    """The text dot sizes a box for (the page writes the same lines, with each eps's figures)."""
    if report is None:
        return box["op"] if box["kind"] == "op" else box["name"]
    digits = "9" * len(str(report.width))
    lines = [
        report.name,
        f"{report.op_type}  {digits} -> {digits}",
        f"fibers {digits}  opfibers {digits}  covers {digits}",
    ]
    return "\n".join(lines + ([f"frozen: {report.note}"] if report.note else []))


def graph_layout(
    graph: gs.Graph, sites: Sequence[Any], reports: Sequence[LayerReport]
) -> dict[str, Any]:
    """The op graph laid out by Graphviz ``dot`` (``-Tjson``) when it is installed and finishes
    within ``DOT_TIMEOUT``, else by ``layered_layout``; see ``view_data`` for the structure."""
    boxes, edges = _graph_nodes(graph, sites)
    by_name = {report.name: report for report in reports}
    dot = shutil.which("dot")
    note = (
        "Graphviz dot is not installed: a simple layered layout "
        "(install graphviz for a clearer one)"
    )
    if dot is not None:
        lines = [
            "digraph G {",
            'node [shape=box, fontsize=10, fontname="Helvetica", margin="0.12,0.06"];',
            "edge [arrowsize=0.6];",
        ]
        for box in boxes:
            shape = ", shape=ellipse" if box["kind"] in ("input", "output") else ""
            lines.append(
                f"n{box['id']} [label={json.dumps(_label(box, by_name.get(box['layer'])))}{shape}];"
            )
        lines += [f"n{a} -> n{b};" for a, b, _ in edges] + ["}"]
        try:
            return _from_dot(json.loads(_dot_json(dot, "\n".join(lines))), boxes, edges)
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            note = f"Graphviz dot failed ({io.first_line(exc)}): a simple layered layout"
    return layered_layout(boxes, edges, note)


@functools.lru_cache(maxsize=8)
def _dot_json(dot: str, source: str) -> str:
    """``dot -Tjson`` of ``source``; kept for the same source (the bases of several eps stops
    often have one graph)."""
    done = subprocess.run(
        [dot, "-Tjson"],
        input=source,
        capture_output=True,
        text=True,
        timeout=DOT_TIMEOUT,
        check=True,
    )
    return done.stdout


def _from_dot(
    laid: dict[str, Any], boxes: list[dict[str, Any]], edges: list[tuple[int, int, str]]
) -> dict[str, Any]:
    """Positions from ``dot -Tjson`` (points, y upwards) turned into the page's (y downwards)."""
    _, _, width, height = (float(v) for v in laid["bb"].split(","))
    by_name = {obj["name"]: obj for obj in laid.get("objects", [])}
    nodes = []
    for box in boxes:
        obj = by_name[f"n{box['id']}"]
        x, y = (float(v) for v in obj["pos"].split(","))
        nodes.append(
            {
                **box,
                "x": round(x, 1),
                "y": round(height - y, 1),
                "w": round(float(obj["width"]) * _POINTS, 1),
                "h": round(float(obj["height"]) * _POINTS, 1),
            }
        )
    gvid = {obj["_gvid"]: int(obj["name"][1:]) for obj in laid.get("objects", [])}
    tensor = {(a, b): t for a, b, t in edges}
    laid_edges = []
    for edge in laid.get("edges", []):
        a, b = gvid[edge["tail"]], gvid[edge["head"]]
        parts = edge["pos"].split()
        tip = next((p[2:] for p in parts if p.startswith("e,")), None)
        points = [[float(v) for v in p.split(",")] for p in parts if p[:2] not in ("e,", "s,")]
        if tip is not None:
            points.append([float(v) for v in tip.split(",")])
        laid_edges.append(
            {
                "from": a,
                "to": b,
                "tensor": tensor[(a, b)],
                "curve": True,
                "points": [[round(x, 1), round(height - y, 1)] for x, y in points],
            }
        )
    return {
        "engine": "dot",
        "note": None,
        "width": width,
        "height": height,
        "nodes": nodes,
        "edges": laid_edges,
    }


def layered_layout(
    boxes: list[dict[str, Any]], edges: list[tuple[int, int, str]], note: str
) -> dict[str, Any]:
    """Each box one row below its deepest predecessor (boxes are in topological order), boxes of a
    row side by side; edges are straight lines. Readable for small models only."""
    depth = [0] * len(boxes)
    for a, b, _ in sorted(edges, key=lambda e: e[1]):
        depth[b] = max(depth[b], depth[a] + 1)
    for box in boxes:  # graph outputs go below everything
        if box["kind"] == "output":
            depth[box["id"]] = max(depth) + 1 if boxes else 0
    rows: dict[int, list[int]] = {}
    for box in boxes:
        rows.setdefault(depth[box["id"]], []).append(box["id"])
    box_w, box_h, gap_x, gap_y = 260.0, 44.0, 30.0, 40.0
    widest = max((len(r) for r in rows.values()), default=1)
    nodes = []
    for box in boxes:
        row = rows[depth[box["id"]]]
        offset = (widest - len(row)) * (box_w + gap_x) / 2
        nodes.append(
            {
                **box,
                "x": offset + row.index(box["id"]) * (box_w + gap_x) + box_w / 2,
                "y": depth[box["id"]] * (box_h + gap_y) + box_h / 2,
                "w": box_w,
                "h": box_h,
            }
        )
    laid_edges = [
        {
            "from": a,
            "to": b,
            "tensor": t,
            "curve": False,
            "points": [
                [nodes[a]["x"], nodes[a]["y"] + box_h / 2],
                [nodes[b]["x"], nodes[b]["y"] - box_h / 2],
            ],
        }
        for a, b, t in edges
    ]
    return {
        "engine": "layered",
        "note": note,
        "width": widest * (box_w + gap_x),
        "height": (max(depth, default=0) + 1) * (box_h + gap_y),
        "nodes": nodes,
        "edges": laid_edges,
    }


# -- outputs --------------------------------------------------------------------------------


def page(data: dict[str, Any]) -> str:
    """The self-contained HTML page: the template with ``data`` embedded as JSON, each channel
    label list packed (``packed``)."""
    template = resources.files("onnxfib").joinpath(_TEMPLATE).read_text(encoding="utf-8")
    payload = json.dumps(packed(data), separators=(",", ":")).replace(
        "<", "\\u003c"
    )  # no '</script>' inside
    return template.replace("/*ONNXFIB_DATA*/null", payload, 1)


def packed(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as the page holds it: each label list of ``analyses[].tensors`` replaced by its
    index in ``partitions``, where each distinct list is stored once (``pack_labels``), and each
    base's layout equal to the model's or to an earlier base's replaced by ``{"same_as":
    "model"}`` or ``{"same_as": k}``."""
    pool: dict[str, int] = {}

    def ref(labels: list[int]) -> int:
        return pool.setdefault(pack_labels(labels), len(pool))

    analyses = [
        {
            **entry,
            "tensors": {
                name: {**figures, **{kind: ref(figures[kind]) for kind in KINDS}}
                for name, figures in entry["tensors"].items()
            },
        }
        for entry in data["analyses"]
    ]
    originals = data.get("bases", [])
    bases = []  # a base drawn as the model, or as an earlier base, points at that layout
    for index, base in enumerate(originals):
        laid = base["layout"]
        same = next((k for k in range(index) if originals[k]["layout"] == laid), None)
        if laid is not None and laid == data.get("layout"):
            laid = {"same_as": "model"}
        elif laid is not None and same is not None:
            laid = {"same_as": same}
        bases.append({**base, "layout": laid})
    return {**data, "analyses": analyses, "partitions": list(pool), "bases": bases}


def pack_labels(labels: Sequence[int]) -> str:
    """Channel labels as text: ``i<n>`` for 0, 1, ..., n - 1 (every channel alone, canonical),
    else ``b``, ``h`` or ``w`` and the base64 of the labels as little-endian unsigned 8, 16 or
    32-bit integers (the page's ``unpack``)."""
    array = np.asarray(labels, dtype=np.int64)
    if np.array_equal(array, np.arange(array.size)):
        return f"i{array.size}"
    top = int(array.max(initial=0))
    code, dtype = ("b", "<u1") if top < 1 << 8 else ("h", "<u2") if top < 1 << 16 else ("w", "<u4")
    return code + base64.b64encode(array.astype(dtype).tobytes()).decode("ascii")


def write_page(
    data: dict[str, Any], path: str | os.PathLike, *, protect: Iterable[str | os.PathLike] = ()
) -> Path:
    """Write the page to ``path`` atomically; refuses to overwrite any of ``protect``."""
    return io.write_text_atomic(path, page(data), protect=protect)


def _columns(
    data: dict[str, Any], layers: Sequence[str] | None, eps_index: int
) -> list[dict[str, Any]]:
    """Columns of the figure: the first chosen layer's input, then each chosen layer's output,
    each with its fiber labels and the edges from the column before (when that column is the
    layer's input, channel for channel, and both are at most ``EDGE_LIMIT`` wide)."""
    known = {layer["name"]: layer for layer in data["layers"]}
    chosen = list(layers) if layers else list(known)
    if not known:
        raise UsageError(
            f"{data['model']} has no layer onnxfib analyses (see 'onnxfib rules'): "
            "no neurons to draw"
        )
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise UsageError(f"--layers names unknown layer(s) {unknown}; the layers are {list(known)}")
    tensors = data["analyses"][eps_index]["tensors"]
    reports = {r["name"]: r for r in data["analyses"][eps_index]["layers"]}
    first = known[chosen[0]]
    columns = []
    if first["input"] in tensors:
        columns.append(
            {
                "gid": first["input"],
                "title": f"{first['input']} (input)",
                "labels": tensors[first["input"]]["fibers"],
                "edges": None,
            }
        )
    previous = "input" if columns else None
    for name in chosen:
        layer, report = known[name], reports[name]
        reads = previous == "input" or (previous is not None and name in known[previous]["next"])
        labels = (
            tensors[layer["output"]]["fibers"]
            if layer["output"] in tensors
            else list(range(report["width"]))
        )
        columns.append(
            {
                "gid": name,
                "title": f"{name}\n{report['fibers']} fibers of {report['width']}",
                "labels": labels,
                "edges": layer["edges"] if reads else None,
            }
        )
        previous = name
    return columns


def figure(
    data: dict[str, Any], *, layers: Sequence[str] | None = None, eps: float | None = None
) -> Any:
    """A matplotlib figure in the style of the paper's Fig. 1 and 2: each column a layer's
    channels (the first chosen layer's input first), one dot per neuron colored by fiber
    (``fiber_colors``), channels of a fiber side by side, edges shaded by |weight| between
    consecutive columns no wider than ``EDGE_LIMIT``. Each column's dots are one scatter whose
    gid is the column's tensor or layer; ``eps`` picks a uniform stop's analysis (default: the
    stop the page opens at, the per-layer one when there is one)."""
    from onnxfib.plotting import pyplot

    if eps is None:
        index = data["start"]
    else:
        eps = check_eps(eps)
        if eps not in data["eps_values"]:
            raise UsageError(f"eps {eps:g} was not analysed; the page holds {data['eps_values']}")
        index = data["eps_values"].index(eps)
    stop = data["stops"][index]
    columns = _columns(data, layers, index)
    widest = max(len(c["labels"]) for c in columns)
    plt = pyplot()
    from matplotlib.collections import LineCollection  # after pyplot(): it names the missing extra

    fig, axes = plt.subplots(
        figsize=(2.2 * len(columns) + 1, max(3.0, min(widest * 0.12, 24.0))), dpi=100
    )
    placed: list[np.ndarray] = []  # per column, the y of each channel
    for x, column in enumerate(columns):
        labels = np.asarray(column["labels"], dtype=np.int64)
        sizes = np.bincount(labels) if labels.size else np.zeros(0, dtype=np.int64)
        order = sorted(range(labels.size), key=lambda i: (-sizes[labels[i]], labels[i], i))
        y = np.empty(labels.size)
        y[order] = np.linspace(0, 1, labels.size) if labels.size > 1 else 0.5
        placed.append(y)
        if column["edges"] is not None and x > 0:
            weights = np.asarray(column["edges"])
            rows, cols = np.nonzero(weights > EDGE_FLOOR)
            segments = [[(x - 1, placed[x - 1][j]), (x, y[i])] for i, j in zip(rows, cols)]
            shades = [(0.0, 0.0, 0.0, 0.6 * float(weights[i, j])) for i, j in zip(rows, cols)]
            axes.add_collection(LineCollection(segments, colors=shades, linewidths=0.6, zorder=1))
        axes.scatter(
            np.full(labels.size, x),
            y,
            c=fiber_colors(labels),
            s=max(8.0, 60.0 - widest / 3),
            edgecolors="#555555",
            linewidths=0.4,
            zorder=2,
            gid=column["gid"],
        )
        axes.text(x, -0.03, column["title"], ha="center", va="bottom", fontsize=7)
    axes.set_xlim(-0.5, len(columns) - 0.5)
    axes.set_ylim(1.03, -0.12)
    axes.axis("off")
    axes.set_title(
        f"{data['model']}: neurons colored by fiber (eps {stop['label']}); grey: alone",
        fontsize=9,
        pad=4,
    )
    fig.tight_layout()
    return fig


def figure_bytes(data: dict[str, Any], kind: str, *, layers: Sequence[str] | None = None) -> bytes:
    """``figure(data, layers=layers)`` as ``kind`` ("png" or "svg") bytes, for the caller to
    write."""
    import io as bytes_io

    from onnxfib.plotting import pyplot

    fig = figure(data, layers=layers)
    buffer = bytes_io.BytesIO()
    try:
        fig.savefig(buffer, format=kind)
    finally:
        pyplot().close(fig)
    return buffer.getvalue()
