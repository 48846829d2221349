"""Size and cost of ``onnxfib view``'s page on BERT-shaped encoders, and opening it in Chromium.

    python benchmarks/view_size.py                       # BERT 2 and 12 layers (BERT-base)
    python benchmarks/view_size.py --layers 2 --compare /path/to/older/checkout

Each model is ``benchmarks/speed.py``'s BERT (``transformers.BertConfig()`` defaults but the number
of layers, random init, seed 0, legacy TorchScript export, planted copies in every
``intermediate.dense``), built into a temporary directory. ``onnxfib view IN -o page.html`` runs as
a child process, measured by ``os.wait4`` (CPU seconds of it and of the ``dot`` it runs, peak
RSS); the page's bytes are split into its parts. The page is then opened by Debian's headless
``chromium --dump-dom`` (CPU seconds of the browser's processes, the page's script must finish).
With ``--compare DIR`` the same is measured with ``PYTHONPATH=DIR`` (an older checkout: the
figure before a change), run back to back on the same model. Writes
``results/view_size.json`` and the ``view_size`` section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
from sections import markers, write_section  # noqa: E402

NAME = "view_size"
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
BEGIN, END = markers(NAME)
CHROMIUM = "/usr/bin/chromium"


def timed(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 3600.0) -> dict:
    """Run ``command`` in ``cwd`` (not the checkout: ``python -m`` would import the onnxfib of
    the working directory before ``PYTHONPATH``'s); its CPU seconds (user + sys, with its
    waited-for children), wall seconds, peak RSS (MiB), exit status and output."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.2)
        out.seek(0)
        text = out.read().decode(errors="replace")
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "wall_s": round(time.monotonic() - start, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "rc": os.waitstatus_to_exitcode(status), "output": text}


def parts(html: str) -> dict[str, int]:
    """Bytes of the page: its template, and the embedded data's top-level keys."""
    match = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    assert match, "no embedded data"
    data = json.loads(match.group(1))
    sizes = {key: len(json.dumps(value, separators=(",", ":"))) for key, value in data.items()}
    return {"template": len(html.encode()) - len(match.group(1).encode()), **sizes}


def measure(model: Path, work: Path, tag: str, pythonpath: str) -> dict:
    """``onnxfib view`` on ``model`` with the code at ``pythonpath``, then the page in Chromium."""
    page = work / f"{tag}.html"
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    run = timed([sys.executable, "-m", "onnxfib", "view", str(model), "-o", str(page), "-q"], work, env)
    if run["rc"] != 0:
        return {"code": pythonpath, "error": run["output"].strip().splitlines()[-1:]}
    html = page.read_text(encoding="utf-8")
    profile = work / f"profile-{tag}"
    opened = timed([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                    "--dump-dom", page.as_uri()], work, timeout=300)
    ready = 'data-ready="1"' in opened["output"] and "data-errors" not in opened["output"]
    return {"code": pythonpath, "view_cpu_s": run["cpu_s"], "view_wall_s": run["wall_s"],
            "view_peak_rss_mib": run["peak_rss_mib"], "page_bytes": len(html.encode()), "parts": parts(html),
            "chromium_cpu_s": opened["cpu_s"], "chromium_wall_s": opened["wall_s"], "page_ready": ready}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 12])
    parser.add_argument("--compare", type=Path, help="an older checkout to measure beside this one")
    parser.add_argument("--model", type=Path, help="use this BERT file (of the first --layers) instead of building")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    import speed

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for layers in args.layers:
            model = args.model if args.model is not None and layers == args.layers[0] else work / f"bert{layers}.onnx"
            if not model.exists():
                speed.build_bert(model, layers)
            case = {"model": f"BERT {layers} layers (speed.py's build_bert)", "load_at_start": os.getloadavg()[0]}
            if args.compare is not None:
                case["before"] = measure(model, work, f"before{layers}", str(args.compare.resolve()))
            case["after"] = measure(model, work, f"after{layers}", str(ROOT))
            print(json.dumps(case), flush=True)
            cases.append(case)
    if not args.no_write:
        RESULTS_JSON.write_text(json.dumps({"machine": os.uname().machine, "cpus": os.cpu_count(), "cases": cases},
                                           indent=1) + "\n")
        write_section(NAME, markdown(cases))
    return 0


def markdown(cases: list[dict]) -> str:
    lines = [BEGIN, "## View page size (`benchmarks/view_size.py`)", "",
             f"`onnxfib view IN -o page.html` (7 eps stops) on speed.py's random-init BERT encoders, "
             f"{os.cpu_count()} shared cores (load average at each start in the table); CPU seconds by "
             "`os.wait4` (the view with its `dot`; headless Chromium's `--dump-dom` until the page's "
             "script finished). `before` is the code given as `--compare`.", "",
             "| model | code | page MB | view CPU s | peak RSS MiB | Chromium CPU s | ready | load |",
             "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        for tag in ("before", "after"):
            m = case.get(tag)
            if m is None:
                continue
            if "error" in m:
                lines.append(f"| {case['model']} | {tag} | failed: {m['error']} | | | | | |")
                continue
            load = "n/a" if case.get("load_at_start") is None else f"{case['load_at_start']:.1f}"
            lines.append(f"| {case['model']} | {tag} | {m['page_bytes'] / 1e6:.3f} | {m['view_cpu_s']} | "
                         f"{m['view_peak_rss_mib']} | {m['chromium_cpu_s']} | {m['page_ready']} | {load} |")
    return "\n".join(lines + ["", END])


if __name__ == "__main__":
    sys.exit(main())
