"""benchmarks/search_speed.py's calibrated mode: the rows it renders are what ddddocr's own
preprocessing makes of a text line, a calibrated search runs in its child process on them, and
calibrated and data-free cases are kept and shown apart."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import Builder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import search_speed  # noqa: E402
from real_models import FONTS, FORTUNES  # noqa: E402


def test_gray_strip_keeps_the_aspect_pads_with_the_page_and_squeezes_long_lines():
    from PIL import Image

    page = np.full((32, 60, 3), 230, dtype=np.uint8)
    page[8:24, 10:50] = 20  # ink
    strip = search_speed.gray_strip(Image.fromarray(page), 64, 256)
    assert strip.shape == (1, 64, 256) and strip.dtype == np.float32
    assert strip.min() < 0.2 and np.allclose(strip[0, :, 120:], 230 / 255, atol=1e-6)  # 120 columns, then page
    wide = search_speed.gray_strip(Image.fromarray(np.tile(page, (1, 10, 1))), 64, 256)
    assert wide.shape == (1, 64, 256) and wide[0, :, -8:].min() < 0.2  # squeezed: ink to the right edge


@pytest.fixture(scope="module")
def rendered() -> np.ndarray:
    if not FORTUNES.is_dir() or not FONTS.is_dir():
        pytest.skip("apt-get install -y fortunes-min fonts-dejavu-core")
    return search_speed.calibration_rows("ddddocr", 6)


def test_calibration_rows_are_distinct_dark_lines_on_light_pages(rendered: np.ndarray):
    assert rendered.shape == (6, 1, 64, 256) and rendered.dtype == np.float32
    assert 0 <= rendered.min() and rendered.max() <= 1
    assert len({row.tobytes() for row in rendered}) == 6
    assert all(np.median(row) > 0.7 and row.min() < 0.35 for row in rendered)


def fixed_batch_cnn(path: Path, planted: bool = False) -> Path:
    """A small Conv/Relu network declaring batch 1, as ddddocr's recogniser does; ``planted``:
    the first layer's last four filters (and biases) copy its first four."""
    rng = np.random.default_rng(0)
    b = Builder()
    w, bias = rng.standard_normal((8, 1, 3, 3)), rng.standard_normal(8)
    if planted:
        w[4:], bias[4:] = w[:4], bias[:4]
    h = b.op("Relu", [b.op("Conv", ["x", b.const(w), b.const(bias)], pads=[1, 1, 1, 1])])
    h = b.op("Relu", [b.op("Conv", [h, b.const(rng.standard_normal((8, 8, 3, 3)) / 8), b.const(rng.standard_normal(8))],
                           pads=[1, 1, 1, 1])])
    y = b.op("Conv", [h, b.const(rng.standard_normal((4, 8, 1, 1)) / 3), b.const(np.zeros(4))])
    onnx.save(b.model({"x": [1, 1, 8, 16]}, y, [1, 4, 8, 16]), str(path))
    return path


def test_held_out_lines_are_distinct_and_none_is_a_calibration_line(rendered: np.ndarray):
    calibration = set(search_speed.text_lines("riddles", 300, search_speed.CALIBRATION_SEED, 12))
    held = search_speed.held_out_lines("ddddocr", 200, 300)
    assert len(set(held)) == 200 and not calibration.intersection(held)
    drawn = search_speed.text_lines("riddles", 800, search_speed.HELD_OUT_SEED, 12)
    assert calibration.intersection(drawn)  # the corpus repeats fragments: the exclusion has work to do


@pytest.mark.slow
def test_held_out_answers_of_an_exact_collapse_all_agree(tmp_path):
    """With the first layer's filters planted twice, its exact collapse keeps 53% of the
    parameters, so it meets keep 0.6, and it answers as the original does on any rows."""
    data, held = tmp_path / "rows.npz", tmp_path / "held.npz"
    rng = np.random.default_rng(1)
    np.savez(data, x=rng.uniform(0, 1, (12, 1, 8, 16)).astype(np.float32))
    np.savez(held, x=rng.uniform(0, 1, (5, 1, 8, 16)).astype(np.float32))
    figures = search_speed.run_search(fixed_batch_cnn(tmp_path / "cnn.onnx", planted=True), "x", (1, 1, 8, 16), 0.6,
                                      300, str(data), str(held))
    assert figures["status"] == "ok", figures
    assert (figures["held_out_rows"], figures["held_out_agreement"], figures["held_out_lines_equal"]) == (5, 1.0, 1.0)


@pytest.mark.slow
def test_a_calibrated_search_runs_on_a_fixed_batch_model(tmp_path):
    data = tmp_path / "rows.npz"
    np.savez(data, x=np.random.default_rng(1).uniform(0, 1, (12, 1, 8, 16)).astype(np.float32))
    figures = search_speed.run_search(fixed_batch_cnn(tmp_path / "cnn.onnx"), "x", (1, 1, 8, 16), 0.5, 300,
                                      str(data))
    assert figures["status"] == "ok", figures
    assert figures["met"] and figures["params_after"] <= 0.5 * figures["params_before"]


def test_calibrated_and_data_free_cases_are_kept_and_shown_apart():
    free = {"model": "ddddocr", "keep": 0.5, "search": "allocation (abc)", "status": "ok", "calib_rows": 0}
    calibrated = {**free, "calib_rows": 1024, "peak_rss_mib": 900, "held_out_rows": 256,
                  "held_out_agreement": 0.97461, "held_out_lines_equal": 0.484375}
    assert search_speed.case_key(free) != search_speed.case_key(calibrated)
    assert search_speed.case_key({k: v for k, v in free.items() if k != "calib_rows"}) == search_speed.case_key(free)
    rows = [line for line in search_speed.markdown([free, calibrated]).splitlines() if line.startswith("| ddddocr")]
    assert [line.split(" | ")[2] for line in rows] == ["-", "1024"]
    assert rows[1].split(" | ")[7] == "900"
    assert [line.split(" | ")[14] for line in rows] == ["-", "0.975, 0.484 (256 lines)"]
