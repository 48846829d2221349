"""Target-search speed on real trained CNNs: a data-free ``target_params`` search, timed.

    python benchmarks/search_speed.py                 # PP-OCR direction classifier, keep 0.5
    python benchmarks/search_speed.py --keep 0.8 0.9 --timeout 900 --append

The models are the trained PP-OCR networks shipped inside the ``rapidocr-onnxruntime`` wheel
(fetched from PyPI with ``pip download --no-deps`` into a cache folder; nothing comes from a model
hub): the mobile direction classifier (``ch_ppocr_mobile_v2.0_cls_infer.onnx``, 134k parameters,
52 searchable layers, input 3 x 48 x 192) and the PP-OCRv4 recogniser
(``ch_PP-OCRv4_rec_infer.onnx``, 2.7M parameters, input 3 x 48 x 320). Each search runs in a child
process, ``onnxfib.compress(model, target_params=keep, input_shapes=..., check=False)`` on generated
inputs (``api.MEASURING_ROWS`` rows per distribution within ``api.MEASURING_MACS``: 128 of the
classifier, 8 of the recogniser), and records its CPU seconds (all threads), peak RSS, the search steps announced, the
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
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sections import markers, write_section  # noqa: E402

NAME = "search_speed"
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
BEGIN, END = markers(NAME)
WHEEL = "rapidocr-onnxruntime==1.4.4"
MODELS = {"ppocr_cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (64, 3, 48, 192)),
          "ppocr_rec": ("ch_PP-OCRv4_rec_infer.onnx", (8, 3, 48, 320))}

CHILD = r"""
import json, sys
import onnxfib
from onnxfib import targets
path, shape, keep = sys.argv[1], tuple(json.loads(sys.argv[2])), float(sys.argv[3])
collapses = {"n": 0}
def counting(method):
    def counted(self, *args, **kwargs):
        collapses["n"] += 1
        return method(self, *args, **kwargs)
    return counted
targets.Evaluator.__call__ = counting(targets.Evaluator.__call__)
targets.Evaluator.probe = counting(targets.Evaluator.probe)
steps = []
result = onnxfib.compress(path, target_params=keep, input_shapes={"x": shape}, check=False, progress=steps.append)
print(json.dumps({"params_before": result.report.params_before, "params_after": result.report.params_after,
                  "met": result.report.target.met, "collapses": collapses["n"],
                  "steps": sum(not line.startswith("measuring layer ") for line in steps),
                  "max_rel": result.report.target.max_rel, "agreement": result.report.target.agreement,
                  "layers": sum(layer.frozen is None for layer in result.report.layers)}))
"""


def fetch_models(cache: Path) -> Path:
    """The wheel's models folder, downloaded once into ``cache``."""
    folder = cache / "rapidocr"
    if not (folder / "rapidocr_onnxruntime" / "models").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(cache)],
                       check=True)
        wheel = next(cache.glob("rapidocr_onnxruntime-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(folder, [n for n in archive.namelist() if n.endswith(".onnx")])
    return folder / "rapidocr_onnxruntime" / "models"


def run_search(path: Path, shape: tuple[int, ...], keep: float, timeout: float) -> dict:
    """One search in a child process: its figures, wall seconds and peak RSS (the largest of
    any child so far: run one search per process for exact figures)."""
    start = time.time()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), json.dumps(shape), str(keep)],
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
    models = fetch_models(args.cache)
    cases = []
    for name in args.models:
        file, shape = MODELS[name]
        for keep in args.keep:
            before, load = os.times(), round(os.getloadavg()[0], 1)
            figures = run_search(models / file, shape, keep, args.timeout)
            after = os.times()
            figures.update(model=name, keep=keep, search="allocation", timeout_s=args.timeout, load_at_start=load,
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
             f"Data-free `target_params` searches on the PP-OCR models of the `{WHEEL}` wheel, on generated "
             f"rows (128 per distribution for the classifier, 8 for the recogniser), on a machine with {os.cpu_count()} cores (shared). *Eager at least* (greedy cases) is one "
             "collapse per searchable layer per step, what the greedy measured before it became lazy. Error "
             "and agreement are the compressed model's against the original on the measuring rows.", "",
             "| model | keep | search | status | CPU s | steps | collapses | eager at least | parameters kept | "
             "max rel. error | agreement | load at start |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        kept = f"{c['params_after'] / c['params_before']:.1%}" if "params_after" in c else "-"
        figure = {key: f"{c[key]:.3g}" if isinstance(c.get(key), float) else "-" for key in ("max_rel", "agreement")}
        lines.append(f"| {c['model']} | {c['keep']} | {c.get('search', 'greedy')} | {c['status']} | {c.get('cpu_s', '-')} | "
                     f"{c.get('steps', '-')} | {c.get('collapses', '-')} | {c.get('eager_at_least', '-')} | {kept} | "
                     f"{figure['max_rel']} | {figure['agreement']} | {c.get('load_at_start', '-')} |")
    return "\n".join(lines + ["", END])


if __name__ == "__main__":
    raise SystemExit(main())
