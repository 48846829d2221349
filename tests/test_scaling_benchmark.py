"""benchmarks/scaling.py in ``--quick`` mode: the structure of its results and properties
recomputed from them (parameter counts from freshly built models, the fitted exponents by an
independent regression, the stop rule of every collapse–retrain round)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
stats = pytest.importorskip("scipy.stats")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scaling  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    if not (scaling.WORDNET / "data.noun").exists() or not scaling.FORTUNES.is_dir():
        pytest.skip("apt-get install -y wordnet-base fortunes-min")
    out = tmp_path_factory.mktemp("scaling") / "quick.json"
    assert scaling.main(["--quick", "--no-write", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_quick_run_has_both_curves_for_every_seed(quick: dict) -> None:
    setup = scaling.QUICK
    assert quick["quick"] and quick["seeds_done"] == len(setup.seeds)
    assert sorted((p["seed"], p["width"]) for p in quick["scratch"]) == sorted(
        (s, w) for s in setup.seeds for w in setup.widths)
    for p in quick["scratch"]:  # counted again on a fresh model of that width
        assert p["params"] == scaling.non_embedding(scaling.CharLM(setup, p["width"]))
    assert [c["seed"] for c in quick["collapse"]] == list(setup.seeds)
    assert set(quick["alpha"]) == {"scratch", "collapse"}


def test_collapse_points_fall_in_size_and_follow_the_stop_rule(quick: dict) -> None:
    tolerance = scaling.QUICK.tolerance
    for c in quick["collapse"]:
        points = c["points"]
        assert points[0]["params"] == scaling.non_embedding(scaling.CharLM(scaling.QUICK, max(scaling.QUICK.widths)))
        assert all(a["params"] > b["params"] for a, b in zip(points, points[1:]))
        for p in points[1:]:
            assert p["accepted"] == (p["val_loss"] <= (1 + tolerance) * points[0]["val_loss"])
        kept = [p for p in points if p["accepted"]]
        assert c["final_params"] == kept[-1]["params"]
        assert c["final_val_loss"] == pytest.approx(kept[-1]["val_loss"], rel=1e-5)


def test_fitted_exponents_match_an_independent_regression(quick: dict) -> None:
    for seed, fitted in zip(scaling.QUICK.seeds, quick["fits"]["scratch"]):
        rows = [p for p in quick["scratch"] if p["seed"] == seed]
        line = stats.linregress(np.log([p["params"] for p in rows]), np.log([p["val_loss"] for p in rows]))
        assert fitted["alpha"] == pytest.approx(-line.slope, rel=1e-6)
    alphas = [f["alpha"] for f in quick["fits"]["collapse"]]
    assert quick["alpha"]["collapse"]["mean"] == pytest.approx(np.mean(alphas))
    low, high = stats.t.interval(0.95, len(alphas) - 1, loc=np.mean(alphas), scale=stats.sem(alphas))
    assert (quick["alpha"]["collapse"]["low"], quick["alpha"]["collapse"]["high"]) == pytest.approx((low, high))
