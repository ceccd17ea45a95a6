"""A run's summary: the accuracy of its last trained rounds (round 0, the untrained start,
never counts)."""

from __future__ import annotations

import pytest

from cahfp.config import load_config
from coordinator.records import summarize


def test_final_accuracies_cover_trained_rounds_only():
    accuracies = [0.10, 0.50, 0.60, 0.70, 0.80, 0.90]  # round 0 .. round 5
    records = [{"round": i, "accuracy": a, "loss": 1.0, "clients": []}
               for i, a in enumerate(accuracies)]  # fmt: skip
    s = summarize(records, load_config(None, {}), 1.0, 0.0)
    assert s["final10_accuracy"] == pytest.approx(0.70)  # rounds 1-5, not round 0's 0.10
    assert s["final3_accuracy"] == pytest.approx(0.80)
    assert s["initial_accuracy"] == 0.10 and s["rounds"] == 5
    short = summarize(records[:2], load_config(None, {}), 1.0, 0.0)
    assert short["final3_accuracy"] == short["final10_accuracy"] == pytest.approx(0.50)
