"""The judge/RM agreement breakdown (rlaif_jax/eval/agreement.py) on hand-made pairs."""

import json
import subprocess
import sys

import pytest

from rlaif_jax.eval import agreement


def _item(question, preference, truth, scores, confidence=0.8):
    return {"conversations": [{"from": "human", "value": f"<image>\n{question}"},
                              {"from": "gpt", "value": ""}],
            "output_1": {"value": "a"}, "output_2": {"value": "b"},
            "preference": preference, "true_preference": truth, "true_scores": scores,
            "confidence": confidence}


ITEMS = [
    _item("What colour is the square?", 1, 1, [1.0, 0.0], 0.9),
    _item("What colour is the square?", 2, 1, [1.0, 0.0], 0.6),
    _item("Describe this video in detail.", 2, 2, [0.30, 0.35], 0.7),
    _item("Describe this video in detail.", 1, 2, [0.5, 0.5], 0.55),
    _item("Which way does the circle move?", 1, 1, [0.2, 0.0], 0.95),
    {"conversations": [{"from": "human", "value": "no truth"}], "preference": 1},
]


def test_gap_bins_cover_ties_small_and_whole_gaps():
    assert agreement.gap_bin([0.5, 0.5]) == "tie"
    assert agreement.gap_bin([0.30, 0.35]) == "(0, 0.1)"
    assert agreement.gap_bin([0.2, 0.0]) == "[0.1, 0.3)"
    assert agreement.gap_bin([1.0, 0.0]) == "[0.3, 1]"
    with pytest.raises(ValueError):
        agreement.gap_bin([2.0, 0.0])


def test_breakdown_by_type_and_gap():
    rows = agreement.judged_rows(ITEMS)
    assert len(rows) == 5  # the pair without a truth is left out
    by_type = agreement.breakdown(rows, "type")
    assert by_type["all"] == (5, pytest.approx(3 / 5))
    assert by_type["colour"] == (2, pytest.approx(0.5))
    assert by_type["describe"] == (2, pytest.approx(0.5))
    assert by_type["motion"] == (1, pytest.approx(1.0))
    by_gap = agreement.breakdown(rows, "gap", order=["tie", "(0, 0.1)"])
    assert list(by_gap)[:3] == ["all", "tie", "(0, 0.1)"]
    assert by_gap["tie"] == (1, 0.0) and by_gap["[0.3, 1]"] == (2, 0.5)


def test_a_tied_reward_counts_one_half_and_ai_labels_are_a_choice():
    rows = [{"type": "colour", "said": 0.5, "truth": 1, "ai": 1},
            {"type": "colour", "said": 2, "truth": 1, "ai": 2}]
    assert agreement.breakdown(rows, "type")["all"] == (2, pytest.approx(0.25))
    assert agreement.breakdown(rows, "type", against="ai")["all"] == (2, pytest.approx(0.75))


def test_confidence_quartiles_rank_the_judge():
    rows = agreement.judged_rows(ITEMS)
    bins = agreement.confidence_bins(rows)
    by_confidence = dict(zip([r["confidence"] for r in rows], bins))
    assert by_confidence[0.55] == "q1" and by_confidence[0.95] == "q4"


def test_cli_prints_the_judge_tables(tmp_path):
    path = tmp_path / "preferences.json"
    path.write_text(json.dumps(ITEMS))
    proc = subprocess.run([sys.executable, "-m", "rlaif_jax.eval.agreement", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "by type" in proc.stdout and "by gap" in proc.stdout
    assert "colour                   2 pairs  0.500" in proc.stdout
    path.write_text(json.dumps(ITEMS[-1:]))
    proc = subprocess.run([sys.executable, "-m", "rlaif_jax.eval.agreement", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no pair carries" in proc.stderr
