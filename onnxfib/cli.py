"""The ``onnxfib`` command line: a thin shell over ``onnxfib.api`` that parses, calls and renders.

Exit codes: 0 success; 1 validation mismatch (no model written); 2 bad usage or bad input; 3 an
internal error (a bug: its traceback, then one ``error:`` line). Every other error is one
``error: ...`` line on stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import onnx
import typer
from rich.console import Console
from rich.table import Table

from onnxfib import api, io
from onnxfib._version import __version__
from onnxfib.errors import OnnxfibError, UsageError, ValidationMismatchError
from onnxfib.analysis import SYMMETRIES
from onnxfib.calibrate import DEFAULT_RIDGE
from onnxfib.report import (
    Barrier,
    CompressionReport,
    LayerReport,
    SweepPoint,
    TargetReport,
    ValidationReport,
    to_json,
)
from onnxfib.rules import default_registry
from onnxfib.validation import DEFAULT_RTOL, DTYPE_TOLERANCES, parse_input_shape


INTERNAL_ERROR = 3


class _App(typer.Typer):
    """A Typer app whose console-script call goes through ``main`` (central error handling)."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        sys.exit(main())


app = _App(
    name="onnxfib",
    help="Compress ONNX models by merging neurons that share a fibration symmetry.",
    pretty_exceptions_enable=False,
    add_completion=False,
    no_args_is_help=True,
)

SYMMETRY_CHOICES = f"[{'|'.join(SYMMETRIES)}]"
EPS_HELP = "Merge tolerance: cosine distance in [0, 2); 0 merges only exact symmetries."
DATA_HELP = ("Inputs to validate on: .npz keyed by input name, or .npy for single-input models; repeatable, "
             "or a directory of such files (one batch each). A fixed-batch model takes any number of samples.")
SHAPE_HELP = "Shape for an input's dynamic dims, NAME:D1,D2,... (repeatable), e.g. input:1,64."
LABELS_HELP = ("Integer class labels (.npy), one per sample of --data: accuracy compares them with the model's "
               "integer label output if it has one, else with the argmax of its first output.")
CALIBRATE_HELP = "Refit the merged layers by ridge least squares on --data (calibration inputs)."
RIDGE_HELP = "Ridge strength of the refit, relative to the mean diagonal of the normal equations."
_BY_DTYPE = (f"default {DEFAULT_RTOL:g}, or by the output's dtype: "
             + ", ".join(f"{onnx.helper.tensor_dtype_to_np_dtype(t)} {r:g}" if t != onnx.TensorProto.BFLOAT16
                         else f"bfloat16 {r:g}" for t, (r, _) in DTYPE_TOLERANCES.items()))
RTOL_HELP = f"Relative tolerance of the validation ({_BY_DTYPE})."
ATOL_HELP = f"Absolute tolerance of the validation, in units of max(1, the output's largest magnitude) ({_BY_DTYPE})."


def _quiet_option(stdout_json: bool = False) -> bool:
    """-q (every command takes -q and -v)."""
    also = " but the --json asked for" if stdout_json else ""
    return typer.Option(False, "-q", "--quiet", metavar="", help=f"Print nothing on success{also}; no progress lines.")


def _verbose_option(help: str) -> bool:
    """-v, whose help says what it adds to this command, or that it adds nothing there."""
    return typer.Option(False, "-v", "--verbose", metavar="", help=help)


NOTHING_MORE = "Accepted as by every command; {}, so there is no more to show."


def _version(value: bool) -> None:
    if value:
        print(f"onnxfib {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", metavar="", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Compress ONNX models by merging neurons that share a fibration symmetry."""


def _shapes(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for text in values or []:
        name, shape = parse_input_shape(text)
        if name in shapes:
            raise UsageError(f"--input-shape given twice for '{name}'")
        shapes[name] = shape
    return shapes


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else "-"


def _validation_table(validation: ValidationReport, informative: bool = False, tolerances_shown: bool = False) -> Table:
    """Per-output errors; ``informative``: the verdict is a target's, so rtol/atol decide nothing;
    ``tolerances_shown``: rtol/atol columns even where every output has the same."""
    count = validation.samples or validation.batches
    inputs = f"{count:,} input{'' if count == 1 else 's'}"
    if validation.mode == "layers":
        inputs += ", each model run one layer at a time"
    if informative:
        table = Table(title=f"Output error against the original ({inputs})")
        columns: tuple[str, ...] = ("output", "max abs error", "max rel error")
    else:
        tolerances = {(out.rtol, out.atol) for out in validation.outputs}
        per_output = len(tolerances) > 1
        if per_output:
            where = "tolerances by output dtype"
        else:
            rtol, atol = tolerances.pop() if tolerances else (validation.rtol, validation.atol)
            given = validation.rtol is not None and validation.atol is not None
            where = f"rtol {rtol:g}, atol {atol:g}" + ("" if given or rtol == DEFAULT_RTOL else " for the output dtype")
        table = Table(title=f"Validation ({where}, {inputs})")
        shown = per_output or tolerances_shown
        columns = ("output", "max abs error", "max rel error", *(("rtol", "atol") if shown else ()), "ok")
    for column in columns:
        table.add_column(column, justify="left" if column == "output" else "right")
    for out in validation.outputs:
        cells = [out.name, f"{out.max_abs:.3g}", f"{out.max_rel:.3g}"]
        if not informative and len(columns) == 6:
            cells += [f"{out.rtol:g}", f"{out.atol:g}"]
        table.add_row(*cells if informative else [*cells, "yes" if out.ok else "[red]NO[/red]"])
    return table


def _target_line(target: TargetReport) -> str:
    """The target, what the result achieved, and the accuracies when labels were given."""
    text = f"Target: {target.describe()}"
    if target.accuracy_before is not None and target.accuracy_after is not None:
        text += f" (accuracy {target.accuracy_before:.2%} -> {target.accuracy_after:.2%})"
    return text + (" [green]met[/green]" if target.met else " [red]NOT met[/red]")


def _layer_eps(values: list[str] | None) -> dict[str, float]:
    """``NAME=EPS`` options as a mapping (the name may contain '=': the last one splits)."""
    chosen: dict[str, float] = {}
    for text in values or []:
        name, sep, value = text.rpartition("=")
        if not sep or not name:
            raise UsageError(f"malformed --layer-eps '{text}': expected NAME=EPS, e.g. /0/Gemm=0.3")
        try:
            chosen[name] = float(value)
        except ValueError:
            raise UsageError(f"malformed --layer-eps '{text}': EPS must be a number") from None
    return chosen


def _render_compress(console: Console, report: CompressionReport, output: Path, verbose: bool) -> None:
    eps = "eps per layer" if any(layer.eps != report.eps for layer in report.layers) else f"eps {report.eps:g}"
    calibrated = ", calibrated" if report.calibrated else ""
    console.print(f"[bold]onnxfib compress[/bold] -> {output} ({eps}, {report.symmetry} base{calibrated})")
    summary = Table()
    for column in ("", "before", "after", "change"):
        summary.add_column(column, justify="left" if not column else "right")
    summary.add_row("parameters", f"{report.params_before:,}", f"{report.params_after:,}", _change(report.params_before, report.params_after))
    summary.add_row("nodes", f"{report.nodes_before:,}", f"{report.nodes_after:,}", _change(report.nodes_before, report.nodes_after))
    for op in dict.fromkeys([*report.ops_before, *report.ops_after]):
        before, after = report.ops_before.get(op, 0), report.ops_after.get(op, 0)
        summary.add_row(f"  {op}", f"{before:,}", f"{after:,}", _change(before, after))
    summary.add_row("size", _size(report.bytes_before), _size(report.bytes_after), _change(report.bytes_before or 0, report.bytes_after or 0))
    summary.add_row("time", "", f"{report.seconds:.2f} s", "")
    console.print(summary)
    layers = report.layers if verbose else [layer for layer in report.layers if layer.width_after != layer.width]
    if layers:
        table = Table(title="Layers" if verbose else "Layers that shrank (-v: all)")
        for column in ("layer", "op", "eps", "width", "params", "frozen"):
            table.add_column(column, justify="left" if column in ("layer", "op", "frozen") else "right")
        for layer in layers:
            table.add_row(
                layer.name, layer.op_type, f"{layer.eps:.4g}", _width(layer),
                f"{layer.params:,} -> {layer.params_after:,}", layer.note,
            )
        console.print(table)
    else:
        console.print(f"No layer shrank ({len(report.layers)} analysed).")
    if report.target is not None:
        console.print(_target_line(report.target))
    if report.validation is not None:
        console.print(_validation_table(report.validation, informative=report.target is not None))
    else:
        console.print("Validation skipped (--check none).")


@app.command()
def compress(
    input: Path = typer.Argument(..., metavar="IN", help="The ONNX model to compress (never modified)."),
    output: Path = typer.Argument(..., metavar="OUT", help="Where to write the compressed model."),
    eps: float = typer.Option(0.0, "--eps", metavar="FLOAT", help=EPS_HELP),
    symmetry: str = typer.Option("fiber", "--symmetry", metavar=SYMMETRY_CHOICES,
                                 help="Base to collapse to: fiber (forward function) or cover."),
    check: str | None = typer.Option(
        None, "--check", metavar="full|layers|none",
        help="Validate the result against the input in ONNX Runtime: both models whole (full), one layer at a time "
             "(layers: bounded memory), or not (none). Default: full, or layers for a model larger than half the "
             "machine's memory.", show_default=False),
    no_check: bool = typer.Option(False, "--no-check", metavar="", help="The same as --check none."),
    rtol: float | None = typer.Option(None, "--rtol", metavar="FLOAT", help=RTOL_HELP, show_default=False),
    atol: float | None = typer.Option(None, "--atol", metavar="FLOAT", help=ATOL_HELP, show_default=False),
    data: list[Path] | None = typer.Option(None, "--data", metavar="PATH", help=DATA_HELP),
    input_shape: list[str] | None = typer.Option(None, "--input-shape", metavar="NAME:D1,D2", help=SHAPE_HELP),
    seed: int = typer.Option(0, "--seed", metavar="INT", help="Seed of the generated validation inputs."),
    layer_eps: list[str] | None = typer.Option(
        None, "--layer-eps", metavar="NAME=EPS", help="One layer's eps, NAME=EPS (repeatable); --eps is the rest's."),
    calibrate: bool = typer.Option(False, "--calibrate", metavar="", help=CALIBRATE_HELP),
    ridge: float = typer.Option(DEFAULT_RIDGE, "--ridge", metavar="FLOAT", help=RIDGE_HELP),
    target_params: float | None = typer.Option(
        None, "--target-params", metavar="FLOAT",
        help="Target: keep at most this fraction of the parameters (0.2 keeps 20%); eps chosen per layer."),
    max_error: float | None = typer.Option(
        None, "--max-error", metavar="FLOAT",
        help="Target: largest output error on the data relative to the output's scale (its largest magnitude; "
             "with --calibrate: held out, each quarter of the rows on a refit of the rest); eps chosen per layer."),
    max_drop: float | None = typer.Option(
        None, "--max-drop", metavar="FLOAT",
        help="Target: accuracy lost on --data against --labels, a fraction (0.01 = one point); held out "
             "like --max-error with --calibrate."),
    min_agreement: float | None = typer.Option(
        None, "--min-agreement", metavar="FLOAT",
        help="Target: share of answers equal to the original's on --data (top-1 of the first output's last axis, per "
             "position for sequences; no labels needed), e.g. 0.99; held out like --max-error with --calibrate."),
    min_cosine: float | None = typer.Option(
        None, "--min-cosine", metavar="FLOAT",
        help="Target: mean cosine of the output rows (last axis) with the original's, for embedding models, "
             "e.g. 0.97; held out like --max-error with --calibrate."),
    labels: Path | None = typer.Option(None, "--labels", metavar="PATH", help=LABELS_HELP),
    report: Path | None = typer.Option(
        None, "--report", metavar="PATH", help="Write the run's report as JSON here (also when validation fails)."
    ),
    save_as_external_data: bool = typer.Option(
        False, "--save-as-external-data", metavar="",
        help="Keep OUT's tensors in OUT.data beside it (as an input with external data does anyway)."),
    size_threshold: int = typer.Option(
        io.EXTERNAL_THRESHOLD, "--size-threshold", metavar="BYTES",
        help="With external data: the tensors of at least this many bytes go to OUT.data."),
    quiet: bool = _quiet_option(),
    verbose: bool = _verbose_option("List every layer, not only those that shrank."),
) -> None:
    """Compress a model; on a validation mismatch exit 1 and write no model.

    With a target (--target-params, --max-error, --max-drop, --min-agreement, --min-cosine) each layer's eps is searched for, \
the target is the verdict (exit 0 when met, 1 and no model when not), and the output error \
against the original is reported, not checked against --rtol/--atol.

    Example: onnxfib compress model.onnx small.onnx --target-params 0.5"""
    shapes = _shapes(input_shape)
    if no_check and check not in (None, "none"):
        raise UsageError(f"--no-check contradicts --check {check}")
    io.check_output_path(output, protect=[input])
    io.check_size_threshold(size_threshold)
    if report is not None:
        io.check_output_path(report, protect=[input])
        if report.resolve() in (output.resolve(), output.resolve().with_name(output.name + ".data")):
            raise UsageError(f"{report}: --report path is the output model's path or its data file's")
    check_value: bool | str = False if no_check else True if check is None else check
    try:
        searching = any(limit is not None for limit in (target_params, max_error, max_drop, min_agreement, min_cosine))
        with _status("searching" if searching else "compressing", quiet) as progress:
            result = api.compress(
                input, eps=eps, layer_eps=_layer_eps(layer_eps), symmetry=symmetry, check=check_value, rtol=rtol,
                atol=atol, data=data or None, input_shapes=shapes, seed=seed, calibrate=calibrate, ridge=ridge,
                target_params=target_params, max_error=max_error, max_drop=max_drop, min_agreement=min_agreement,
                min_cosine=min_cosine, labels=labels,
                progress=progress,
            )
    except ValidationMismatchError as exc:
        if report is not None and isinstance(exc.report, CompressionReport):
            io.write_text_atomic(report, to_json(exc.report.to_dict()), protect=[input])
        if str(exc).startswith("target not met"):
            raise ValidationMismatchError(f"{exc}; nothing written to {output}", exc.report) from exc
        gain = ""
        if isinstance(exc.report, CompressionReport):
            before, after = exc.report.params_before, exc.report.params_after
            gain = f"; it would have kept {after:,} of {before:,} parameters ({_change(before, after)})"
        raise ValidationMismatchError(
            f"validation mismatch: {exc}; nothing written to {output}{gain}; to accept the error pass --no-check "
            "or a looser --rtol/--atol, or give a target such as --max-error", exc.report) from exc
    result.save(output, external_data=save_as_external_data, size_threshold=size_threshold)
    if report is not None:
        io.write_text_atomic(report, to_json(result.report.to_dict()), protect=result.inputs)
    if not quiet:
        _render_compress(_console(), result.report, output, verbose)


def _width(layer: LayerReport) -> str:
    """'before -> after', with the per-block widths of heads, groups or directions."""
    text = f"{layer.width} -> {layer.width_after}"
    if layer.blocks > 1:
        b = layer.blocks
        text += f" ({b}x{layer.width // b} -> {b}x{layer.width_after // b})"
    return text


def _layers_table(layers: list[LayerReport], eps: float) -> Table:
    table = Table(title=f"Layers (eps {eps:g}); width and params: now -> after a collapse")
    for column in ("layer", "op", "width", "fibers", "opfibers", "covers", "largest", "params", "frozen"):
        table.add_column(column, justify="left" if column in ("layer", "op", "frozen") else "right")
    for layer in layers:
        table.add_row(
            layer.name, layer.op_type, _width(layer), str(layer.fibers),
            str(layer.opfibers), str(layer.covers), str(layer.largest_fiber),
            f"{layer.params:,} -> {layer.params_after:,}", layer.note,
        )
    return table


def _barriers_table(barriers: list[Barrier]) -> Table:
    table = Table(title="Barriers (ops no rule binds; their neighbours keep their widths)")
    for column in ("node", "op", "why"):
        table.add_column(column)
    for barrier in barriers:
        op = barrier.op_type if not barrier.domain else f"{barrier.domain} {barrier.op_type}"
        table.add_row(barrier.name, op, barrier.reason)
    return table


#: Seconds between two progress lines on a stderr that is not a terminal (CI logs, pipes).
PLAIN_PROGRESS_INTERVAL = 5.0


class _PlainProgress:
    """Progress as plain ``task: line`` lines on ``stream``, at most one per ``interval`` seconds;
    ``close`` prints the last line if the interval held it back."""

    def __init__(self, task: str, stream: TextIO, interval: float = PLAIN_PROGRESS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.task, self.stream, self.interval, self.clock = task, stream, interval, clock
        self.shown: float | None = None
        self.pending: str | None = None

    def __call__(self, line: str) -> None:
        now = self.clock()
        if self.shown is not None and now - self.shown < self.interval:
            self.pending = line
            return
        self._print(line)
        self.shown = now

    def close(self) -> None:
        if self.pending is not None:
            self._print(self.pending)

    def _print(self, line: str) -> None:
        self.pending = None
        print(f"{self.task}: {line}", file=self.stream, flush=True)


@contextlib.contextmanager
def _status(task: str, quiet: bool) -> Iterator[Callable[[str], None] | None]:
    """Progress on stderr through the callback yielded (None when ``quiet``): a status line in a
    terminal, else plain lines at most every ``PLAIN_PROGRESS_INTERVAL`` seconds (and the last)."""
    if quiet:
        yield None
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        plain = _PlainProgress(task, sys.stderr)
        try:
            yield plain
        finally:
            plain.close()
        return
    with console.status(f"{task}...") as status:
        yield lambda line: status.update(f"{task}: {line}")


def _console() -> Console:
    """A console for stdout; at least 120 columns wide when stdout is not a terminal."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    return console


@app.command()
def inspect(
    input: Path = typer.Argument(..., metavar="IN", help="The ONNX model to analyse."),
    eps: float = typer.Option(0.0, "--eps", metavar="FLOAT", help=EPS_HELP),
    data: list[Path] | None = typer.Option(
        None, "--data", metavar="PATH", help=DATA_HELP + " Given (or --input-shape): the collapse is run on them."),
    input_shape: list[str] | None = typer.Option(None, "--input-shape", metavar="NAME:D1,D2", help=SHAPE_HELP),
    rtol: float | None = typer.Option(None, "--rtol", metavar="FLOAT", help=RTOL_HELP, show_default=False),
    atol: float | None = typer.Option(None, "--atol", metavar="FLOAT", help=ATOL_HELP, show_default=False),
    seed: int = typer.Option(0, "--seed", metavar="INT", help="Seed of the generated inputs (with --input-shape)."),
    as_json: bool = typer.Option(False, "--json", metavar="",
                                 help="Print the per-layer figures, the barriers and any errors measured as JSON."),
    quiet: bool = _quiet_option(stdout_json=True),
    verbose: bool = _verbose_option("Show each output's rtol and atol in the table of errors measured."),
) -> None:
    """Show each layer's fibers, opfibers and covers, what a collapse removes, and the barriers.

    A collapse at --eps: each layer's width before and after and the parameters it would keep; \
each barrier (an op reading a channel axis that no rule binds) with its rule's reason. With --data \
or --input-shape the collapse is also run against the original in ONNX Runtime on those inputs, \
as compress checks it, and its errors are shown; nothing is written and the exit is 0 whatever they are.

    Example: onnxfib inspect model.onnx --eps 0.1 --data inputs.npz"""
    found = api.inspection(input, eps=eps, data=data or None, input_shapes=_shapes(input_shape), seed=seed,
                           rtol=rtol, atol=atol)
    if as_json:
        measured = {} if found.validation is None else {"validation": found.validation.to_dict()}
        print(to_json({"layers": [layer.to_dict() for layer in found.layers],
                       "barriers": [barrier.to_dict() for barrier in found.barriers], **measured}))
    elif not quiet:
        console = _console()
        console.print(_layers_table(found.layers, eps))
        if found.barriers:
            console.print(_barriers_table(found.barriers))
        if found.validation is not None:
            console.print(_validation_table(found.validation, tolerances_shown=verbose))


@app.command()
def view(
    input: Path = typer.Argument(..., metavar="IN", help="The ONNX model to look at (never modified)."),
    eps: float = typer.Option(0.0, "--eps", metavar="FLOAT", help=EPS_HELP + " Added to the page's eps control."),
    output: Path | None = typer.Option(None, "-o", "--output", metavar="PATH",
                                       help="Write the HTML page here (default: IN with .html, unless --png/--svg/--json)."),
    png: Path | None = typer.Option(None, "--png", metavar="PATH", help="Write a static figure (PNG): neurons colored by fiber."),
    svg: Path | None = typer.Option(None, "--svg", metavar="PATH", help="Write the static figure as SVG."),
    layers: str | None = typer.Option(None, "--layers", metavar="NAME,NAME,...",
                                      help="Layers of the static figure, comma-separated (default: every layer)."),
    json_out: Path | None = typer.Option(None, "--json", metavar="PATH", help="Write the page's data as JSON here."),
    layer_eps: list[str] | None = typer.Option(
        None, "--layer-eps", metavar="NAME=EPS",
        help="One layer's eps, NAME=EPS (repeatable; --eps is the rest's): a stop of the eps control, the one the page opens at."),
    settings_of: Path | None = typer.Option(
        None, "--settings-of", metavar="PATH",
        help="A model onnxfib compress wrote from IN, or its --report JSON: its eps per layer (a target's too) and "
             "symmetry become the stop the page opens at."),
    symmetry: str | None = typer.Option(None, "--symmetry", metavar=SYMMETRY_CHOICES,
                                        help="Base to collapse to: fiber or cover (default: fiber, or --settings-of's)."),
    quiet: bool = _quiet_option(),
    verbose: bool = _verbose_option(NOTHING_MORE.format("the page holds everything")),
) -> None:
    """Draw the colored network: a self-contained HTML page and, with --png/--svg, a static figure.

    The page holds the op graph, each layer's channels colored by fiber, an eps control, and the \
base: the collapsed model's own graph and weights.

    Example: onnxfib view model.onnx --settings-of small.onnx -o model.html"""
    from onnxfib import viewer as views

    if settings_of is not None and layer_eps:
        raise UsageError("--settings-of and --layer-eps both give the eps per layer: give one")
    settings = views.recorded(settings_of) if settings_of is not None else None
    if settings is not None and symmetry is not None and symmetry != settings.symmetry:
        raise UsageError(f"--symmetry {symmetry} contradicts {settings_of}, compressed to the {settings.symmetry} base")
    chosen_eps = settings.layer_eps if settings is not None else _layer_eps(layer_eps) if layer_eps else None
    chosen = [name.strip() for name in layers.split(",") if name.strip()] if layers is not None else None
    figures = [(path, kind) for path, kind in ((png, "png"), (svg, "svg")) if path is not None]
    if chosen is not None and not figures:
        raise UsageError("--layers chooses the static figure's layers: give --png or --svg with it")
    page = output if output is not None or figures or json_out else input.with_suffix(".html")
    written = [path for path in (page, *(path for path, _ in figures), json_out) if path is not None]
    for path in written:
        io.check_output_path(path, protect=[input])
    if len({path.resolve() for path in written}) < len(written):
        raise UsageError("the output paths must differ")
    if figures:  # without matplotlib, fail before the analyses rather than after them
        from onnxfib.plotting import pyplot

        pyplot()
    with _status("analysing", quiet):
        data = views.view_data(
            input, eps=settings.eps if settings is not None else eps, layer_eps=chosen_eps,
            eps_values=(*views.EPS_VALUES, eps), source=settings.source if settings is not None else None,
            widths=settings.widths if settings is not None else None,
            symmetry=settings.symmetry if settings is not None else symmetry or "fiber",
            layout=page is not None or json_out is not None)
    rendered = [(path, views.figure_bytes(data, kind, layers=chosen)) for path, kind in figures]
    if page is not None:
        views.write_page(data, page, protect=[input])
    if json_out is not None:
        io.write_text_atomic(json_out, to_json(data, indent=None), protect=[input])
    for path, content in rendered:
        io.write_bytes_atomic(path, content, protect=[input])
    if not quiet:
        for path in written:
            print(f"wrote {path}")


@app.command()
def validate(
    reference: Path = typer.Argument(..., metavar="REFERENCE", help="The reference ONNX model."),
    candidate: Path = typer.Argument(..., metavar="CANDIDATE", help="The model to compare with it."),
    data: list[Path] | None = typer.Option(None, "--data", metavar="PATH", help=DATA_HELP),
    input_shape: list[str] | None = typer.Option(None, "--input-shape", metavar="NAME:D1,D2", help=SHAPE_HELP),
    rtol: float | None = typer.Option(None, "--rtol", metavar="FLOAT", help=RTOL_HELP, show_default=False),
    atol: float | None = typer.Option(None, "--atol", metavar="FLOAT", help=ATOL_HELP, show_default=False),
    seed: int = typer.Option(0, "--seed", metavar="INT", help="Seed of the generated inputs."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the report as JSON (per-output errors, tolerances, ok)."),
    quiet: bool = _quiet_option(stdout_json=True),
    verbose: bool = _verbose_option("Show each output's rtol and atol in the table."),
) -> None:
    """Compare two models' outputs in ONNX Runtime; exit 1 when they differ beyond tolerance.

    Example: onnxfib validate model.onnx small.onnx --data inputs.npz --json"""
    result = api.validate(
        reference, candidate, data=data or None, input_shapes=_shapes(input_shape), seed=seed, rtol=rtol, atol=atol
    )
    if as_json:
        print(to_json(result.to_dict()))
    elif not quiet:
        _console().print(_validation_table(result, tolerances_shown=verbose))
    if not result.ok:
        bad = ", ".join(o.name for o in result.outputs if not o.ok)
        raise ValidationMismatchError(f"validation mismatch: {candidate} differs from {reference} on {bad}")


def _sweep_table(points: list[SweepPoint]) -> Table:
    labelled = points[0].accuracy is not None
    table = Table(title="Sweep: parameters kept against output error (uniform eps)")
    columns = ["eps", "params kept", "params", "max abs error", "rel rms error"] + (["accuracy"] if labelled else [])
    for column in columns:
        table.add_column(column, justify="right")
    for point in points:
        cells = [f"{point.eps:g}", f"{point.params_kept:.2%}", f"{point.params:,}", f"{point.max_abs:.3g}", f"{point.rms:.3g}"]
        table.add_row(*cells, *([f"{point.accuracy:.2%}"] if labelled else []))
    return table


def _sweep_png(points: list[SweepPoint], title: str) -> bytes:
    """A PNG of accuracy (with labels) or relative rms output error against parameters kept."""
    import io as bytes_io

    from onnxfib.plotting import pyplot

    plt = pyplot()

    labelled = points[0].accuracy is not None
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    kept = [100 * p.params_kept for p in points]
    values = [100 * p.accuracy for p in points] if labelled else [p.rms for p in points]
    axes.plot(kept, values, marker="o")
    for point, x, y in zip(points, kept, values):
        axes.annotate(f"{point.eps:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel("parameters kept (%)")
    axes.set_ylabel("accuracy (%)" if labelled else "relative rms output error")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    buffer = bytes_io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _eps_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"malformed --eps '{text}': expected numbers separated by commas, e.g. 0,0.2,0.4") from None


@app.command()
def sweep(
    input: Path = typer.Argument(..., metavar="IN", help="The ONNX model to sweep (never modified)."),
    eps: str = typer.Option(",".join(f"{e:g}" for e in api.SWEEP_EPS), "--eps", metavar="EPS,EPS,...",
                            help="Uniform eps values, comma-separated."),
    data: list[Path] | None = typer.Option(None, "--data", metavar="PATH",
                                           help="Inputs to measure on (.npz/.npy files or directories, repeatable); "
                                                "generated when absent."),
    labels: Path | None = typer.Option(None, "--labels", metavar="PATH", help=LABELS_HELP),
    calibrate: bool = typer.Option(False, "--calibrate", metavar="", help=CALIBRATE_HELP),
    ridge: float = typer.Option(DEFAULT_RIDGE, "--ridge", metavar="FLOAT", help=RIDGE_HELP),
    symmetry: str = typer.Option("fiber", "--symmetry", metavar=SYMMETRY_CHOICES, help="Base to collapse to: fiber or cover."),
    input_shape: list[str] | None = typer.Option(None, "--input-shape", metavar="NAME:D1,D2", help=SHAPE_HELP),
    seed: int = typer.Option(0, "--seed", metavar="INT", help="Seed of the generated inputs."),
    json_out: Path | None = typer.Option(None, "--json", metavar="PATH", help="Write the points as JSON here."),
    plot: Path | None = typer.Option(None, "--plot", metavar="PATH",
                                     help="Write a PNG plot here (accuracy with --labels, else error)."),
    quiet: bool = _quiet_option(),
    verbose: bool = _verbose_option(NOTHING_MORE.format("the table shows every point")),
) -> None:
    """Parameters kept against output error (or accuracy) over a range of eps: table, JSON, PNG.

    Example: onnxfib sweep model.onnx --eps 0,0.2,0.4 --plot sweep.png"""
    values = _eps_list(eps)
    outputs = [path for path in (json_out, plot) if path is not None]
    for path in outputs:
        io.check_output_path(path, protect=[input, *(data or []), *([labels] if labels else [])])
    if json_out is not None and plot is not None and json_out.resolve() == plot.resolve():
        raise UsageError(f"{plot}: --json and --plot name the same file")
    if plot is not None:  # without matplotlib, fail before the sweep rather than after it
        from onnxfib.plotting import pyplot

        pyplot()
    with _status("sweeping", quiet) as progress:
        points = api.sweep(input, eps_values=values, symmetry=symmetry, data=data or None, labels=labels,
                           input_shapes=_shapes(input_shape), seed=seed, calibrate=calibrate, ridge=ridge,
                           progress=progress)
    png = _sweep_png(points, f"{input.name}{' (calibrated)' if calibrate else ''}") if plot is not None else None
    if json_out is not None:
        io.write_text_atomic(json_out, to_json([p.to_dict() for p in points]), protect=[input])
    if png is not None:
        io.write_bytes_atomic(plot, png, protect=[input])
    if not quiet:
        _console().print(_sweep_table(points))


@app.command()
def rules(
    quiet: bool = _quiet_option(),
    verbose: bool = _verbose_option(NOTHING_MORE.format("the table lists every op")),
) -> None:
    """List the ops onnxfib understands; every other op is a barrier that keeps its neighbours' widths.

    Example: onnxfib rules"""
    if quiet:
        return
    table = Table(title="Rules (any other op is a barrier)")
    table.add_column("domain")
    table.add_column("op")
    for domain, op_type in default_registry().op_types():
        table.add_row(domain or "ai.onnx", op_type)
    _console().print(table)


def _error(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="onnxfib", standalone_mode=False)
    except typer.TyperException as exc:  # the command line's own errors (typer's vendored click's)
        if type(exc).__name__ == "NoArgsIsHelpError":  # as typer tells it, which keeps the class private
            if exc.format_message():  # typer's rich help is already printed; plain help is the message
                print(exc.format_message(), file=sys.stderr)
            return exc.exit_code
        context = getattr(exc, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context is not None else ""
        _error(exc.format_message() + hint)
        return exc.exit_code
    except typer.Abort:
        _error("aborted")
        return 130
    except OnnxfibError as exc:
        _error(str(exc))
        return exc.exit_code
    except Exception as exc:  # a bug: keep the traceback for the report, but not Python's exit 1
        traceback.print_exc()
        _error(f"internal error ({type(exc).__name__}): this is a bug in onnxfib; please report it with the traceback above")
        return INTERNAL_ERROR
    return code if isinstance(code, int) else 0
