"""The context-reading probe (rlaif_jax/eval/context_probe.py) on a hand-made video with a
model that always reads the last clip's answer when given a context."""


import numpy as np
import pytest

from rlaif_jax.data import prompts
from rlaif_jax.data.synthetic import text, world
from rlaif_jax.eval import context_probe
from tests.support import hand_made_truth, run_probe


def _truths():
    """A circle red -> blue at frame 4 (8 frames, clips 0-2 / 3-5 / 6-7), alone in the video."""
    objects = [{"shape": "circle", "colour": "red", "new_colour": "blue", "change_frame": 4,
                "motion": "still", "appear_frame": 0, "start": [10.0, 10.0], "radius": 4.0}]
    return {"eval_00000": hand_made_truth(objects)}


def test_probe_grades_each_context_mode():
    asked = []

    def answer(asks):
        asked.extend(asks)
        replies = []
        for (_, clip), question in asks:
            if clip is not None:  # its own clip answers: the last clip seen wrong
                assert question.startswith(prompts.CLIP_QUESTION_LEAD)
                replies.append("white" if clip == 2 else "red")
            elif prompts.CONTEXT_LEAD in question:  # reads the last clip's answer
                context = question.split("\nQuestion: ")[0][len(prompts.CONTEXT_LEAD):]
                replies.append(prompts.split_clip_descriptions(context)[-1].rstrip("."))
            else:
                replies.append("red")
        return replies

    records = context_probe.probe(_truths(), answer)
    specs = context_probe.probed_specs(_truths()["eval_00000"])
    assert len(records) == len(specs) and {r["type"] for r in records} >= {"colour_end", "count"}
    # one pass of clip questions, then each question once per mode
    assert len(asked) == len(specs) * (world.NUM_CLIPS + len(context_probe.MODES))
    end = next(r for r in records if r["type"] == "colour_end")
    assert (end["none"], end["true"], end["own"], end["wrong"]) == (0.0, 1.0, 0.0, 0.0)
    start = next(r for r in records if r["type"] == "colour_start")
    assert (start["none"], start["true"]) == (1.0, 0.0)  # the last clip is the wrong one to read
    rows = {r["type"]: r for r in context_probe.summarize(records)}
    assert rows["all"]["n"] == len(records)
    assert rows["time-localised"]["n"] == sum(r["type"] in text.TEMPORAL_TYPES for r in records)
    gain = np.array([r["own"] - r["none"] for r in records])
    assert rows["all"]["gain_own"] == pytest.approx(gain.mean())
    assert "| colour_end | 1 | 0.000 | 1.000 | 0.000 | 0.000 |" in context_probe.format_table(
        list(rows.values()))


@pytest.mark.slow
def test_probe_command_runs_on_the_smoke_model(smoke_workdir, tmp_path):
    proc, result, truths = run_probe("rlaif_jax.eval.context_probe", smoke_workdir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| all |" in proc.stdout
    asked = sum(len(context_probe.probed_specs(t)) for name, t in truths.items()
                if name.startswith("eval_"))
    rows = {r["type"]: r for r in result["rows"]}
    assert rows["all"]["n"] == asked == len(result["records"])
    assert all(0.0 <= r[m] <= 1.0 for r in result["rows"] for m in context_probe.MODES)
