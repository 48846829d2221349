"""Sweeps: every point agrees with an independent compression at its eps, measured in ONNX
Runtime; the command writes a table, a JSON file and a PNG plot and leaves the input alone."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import build_mlp, sha256

import onnxfib
from onnxfib.cli import main
from onnxfib.errors import UsageError
from onnxfib.plotting import pyplot
from onnxfib.validation import run_tensors


def test_sweep_points_match_independent_compressions():
    model = build_mlp([8, 16, 12, 3])
    data = {"x": np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)}
    labels = np.random.default_rng(1).integers(0, 3, 64)
    values = [0.0, 0.5, 0.9]
    points = onnxfib.sweep(model, eps_values=values, data=data, labels=labels)
    assert [p.eps for p in points] == values
    (reference,), = run_tensors(model, ["y"], [data], "original")
    for point in points:
        result = onnxfib.compress(model, eps=point.eps, check=False)
        assert point.params == result.report.params_after
        assert point.params_kept == pytest.approx(result.report.params_after / result.report.params_before)
        (out,), = run_tensors(result.model, ["y"], [data], "compressed")
        assert point.max_abs == pytest.approx(float(np.max(np.abs(out - reference))), abs=1e-6)
        assert point.accuracy == pytest.approx(float(np.mean(out.argmax(1) == labels)))
    assert points[0].max_abs < 1e-4 and points[0].params_kept < 1.0  # eps 0: exact merges only


def test_sweep_rejects_bad_eps():
    with pytest.raises(UsageError, match="eps"):
        onnxfib.sweep(build_mlp([8, 16, 3]), eps_values=[0.1, 2.5])


def test_sweep_command_writes_table_json_and_png(tmp_path, mlp_path, capsys):
    before = sha256(mlp_path)
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    out_json, out_png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = main(["sweep", str(mlp_path), "--eps", "0,0.4,0.8", "--data", str(tmp_path / "data.npz"),
                 "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "params kept" in stdout and "max abs error" in stdout
    points = json.loads(out_json.read_text())
    assert [p["eps"] for p in points] == [0.0, 0.4, 0.8] and all("params_kept" in p for p in points)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sha256(mlp_path) == before


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_accuracy_of_a_classifier_with_a_label_output(tmp_path):
    """skl2onnx classifiers put an integer ``label`` output first and the probabilities second:
    the accuracy is the label output's, and at eps 0 it equals scikit-learn's own score."""
    pytest.importorskip("skl2onnx")
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    from planted_utils import export_sklearn

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    clf = MLPClassifier((24,), max_iter=300, random_state=0).fit(X[:1200], y[:1200])
    path = export_sklearn(clf, tmp_path / "digits_clf.onnx")
    data, labels = {"input": X[1200:]}, y[1200:]
    points = onnxfib.sweep(str(path), eps_values=[0.0, 0.6], data=data, labels=labels)
    assert points[0].accuracy == pytest.approx(clf.score(X[1200:], labels))
    result = onnxfib.compress(str(path), data=data, labels=labels, max_drop=0.02)
    assert result.report.target.met and result.report.target.accuracy_after >= clf.score(X[1200:], labels) - 0.02


@pytest.mark.slow
def test_sweep_plot_without_matplotlib_is_a_one_line_usage_error(tmp_path, mlp_path):
    out_png = tmp_path / "sweep.png"
    code = ("import sys; sys.modules['matplotlib'] = None; from onnxfib.cli import main; "
            f"sys.exit(main(['sweep', {str(mlp_path)!r}, '--eps', '0', '--plot', {str(out_png)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        'error: plotting needs matplotlib, which is not installed: pip install "onnxfib[plot]"']
    assert not out_png.exists()


def test_plots_without_matplotlib_raise_usage_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError, match=r'pip install "onnxfib\[plot\]"'):
        pyplot()
