"""The perfect reader of clip answers (rlaif_jax/eval/context_bound.py) on hand-made pairs."""

import numpy as np
import pytest

from rlaif_jax.eval import context_bound


@pytest.mark.parametrize("kind,colours,expected", [
    ("colour_start", [None, "red", "blue"], ("colour", "red")),  # the first clip showing it
    ("colour_end", ["red", "red", "blue"], ("colour", "blue")),
    ("colour_end", ["red", "blue", None], None),  # the last clip names no single colour
    ("appear_when", [None, None, "green"], ("time", "end")),
    ("change_when", ["red", "blue", "blue"], ("time", "middle")),
    ("change_when", ["red", None, "blue"], None),  # a gap: no clip pair to compare
    ("change_when", ["red", "red", "red"], None),
    ("before_after", ["red", "red", "red"], None),  # not read from colours
])
def test_what_the_clip_colours_say(kind, colours, expected):
    assert context_bound.clip_derived_answer(kind, colours) == expected


def _pair(pair_id, question, kind, outputs, scores, with_context, no_context):
    return {"id": pair_id, "question": question, "question_type": kind,
            "output_1": outputs[0], "output_2": outputs[1], "true_scores": list(scores),
            "preference": with_context, "preference_no_context": no_context}


def test_the_reader_prefers_the_answer_its_clips_give_and_otherwise_keeps_the_verdict():
    rows = [
        # the clips say blue at the end: the reader picks answer 2, the right one
        _pair("a", "What colour is the circle at the end?", "colour_end", ("red", "blue"),
              (0.0, 1.0), 1, 1),
        # both answers differ from the clips' colour: the no-context verdict stands
        _pair("b", "What colour is the circle at the end?", "colour_end", ("red", "green"),
              (1.0, 0.0), 2, 2),
        # the clips put the change in the middle, the wrong answer: the reader follows them
        _pair("c", "When does the circle change colour?", "change_when",
              ("at the end", "in the middle"), (1.0, 0.0), 1, 1),
        _pair("d", "What colour is the circle at the end?", "colour_end", ("red", "blue"),
              (0.5, 0.5), 1, 1),  # a tie of the truth: left out
        _pair("e", "Which way does the circle move?", "motion", ("up", "down"),
              (1.0, 0.0), 1, 1),  # not a type the reader reads
    ]
    asked = []

    def answer(asks):
        asked.extend(asks)
        return [{0: "red", 1: "blue", 2: "blue"}[clip] for (_, clip), _q in asks]

    records = context_bound.bound(rows, {r["id"]: "train_00001" for r in rows}, answer)
    assert [r["id"] for r in records] == ["a", "b", "c"]
    assert {q for _, q in asked} == {"What colour is the circle?"} and len(asked) == 3
    assert [(r["reader"], r["no_context"], r["with_context"]) for r in records] == [
        (1.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 1.0, 1.0)]
    table = {row["type"]: row for row in context_bound.summarize(records)}
    assert table["all"]["n"] == 3 and table["all"]["reader"] == pytest.approx(1 / 3)
    gain = np.array([1.0, 0.0, -1.0])
    assert table["all"]["reader_gain"] == pytest.approx(0.0)
    assert table["all"]["reader_gain_se"] == pytest.approx(gain.std(ddof=1) / np.sqrt(3))
    only_colour = context_bound.bound(rows, {r["id"]: "v" for r in rows}, answer,
                                      types=("colour_start", "colour_end"))
    assert [r["id"] for r in only_colour] == ["a", "b"]
    assert "| colour_end | 2 |" in context_bound.format_table(context_bound.summarize(records))
