"""The whole-video vs clip probe (rlaif_jax/eval/clip_probe.py): grading on a hand-made video,
and the command end to end on the smoke SFT model."""


import pytest

from rlaif_jax.eval import clip_probe
from tests.support import hand_made_truth, run_probe


def _truth():
    """8 frames, clips 0-2 / 3-5 / 6-7: a circle red -> blue at frame 4 (the middle clip), a
    square appearing green at frame 3 and never changing."""
    objects = [
        {"shape": "circle", "colour": "red", "new_colour": "blue", "change_frame": 4,
         "motion": "still", "appear_frame": 0, "start": [10.0, 10.0], "radius": 4.0},
        {"shape": "square", "colour": "green", "new_colour": None, "change_frame": None,
         "motion": "still", "appear_frame": 3, "start": [40.0, 40.0], "radius": 4.0}]
    return {"eval_00000": hand_made_truth(objects)}


# What a model might say: right from the clips, wrong about time from the whole video.
SAYS = {
    (None, "What colour is the circle at the start?"): "red",
    (None, "What colour is the circle at the end?"): "red",
    (None, "When does the circle change colour?"): "at the end",
    (None, "What colour is the square at the start?"): "green",
    (None, "What colour is the square at the end?"): "blue",
    (0, "What colour is the circle?"): "red",
    (1, "What colour is the circle?"): "blue",
    (2, "What colour is the circle?"): "blue",
    (1, "What colour is the square?"): "green",
    (2, "What colour is the square?"): "green",
}


def test_probe_grades_both_routes_on_a_hand_made_video():
    asked = []

    def answer(asks):
        asked.extend(asks)
        return [SAYS[(clip, question)] for (_, clip), question in asks]

    records = clip_probe.probe(_truth(), answer)
    assert len(asked) == len(SAYS)  # clip 0 is not asked about the square: it is not there yet
    got = {(r["shape"], r["type"]): (r["whole"], r["clip"]) for r in records}
    assert got == {("circle", "colour_start"): (1.0, 1.0), ("circle", "colour_end"): (0.0, 1.0),
                   ("circle", "change_when"): (0.0, 1.0),  # clips: red, blue -> the middle
                   ("square", "colour_start"): (1.0, 1.0), ("square", "colour_end"): (0.0, 1.0)}
    rows = {(r["type"], r["changes_colour"]): r for r in clip_probe.summarize(records)}
    assert rows[("colour_end", True)]["n"] == 1 and rows[("colour_end", True)]["gain"] == 1.0
    assert rows[("colour_start", False)]["whole"] == 1.0
    assert "| change_when | change colour | 1 |" in clip_probe.format_table(
        clip_probe.summarize(records))


def test_an_answer_naming_two_colours_is_wrong():
    def answer(asks):
        return ["red and blue" if clip is None else SAYS[(clip, q)] for (_, clip), q in asks]

    records = clip_probe.probe(_truth(), answer)
    assert all(r["whole"] == 0.0 for r in records if r["type"] != "change_when")


@pytest.mark.slow
def test_probe_command_runs_on_the_smoke_model(smoke_workdir, tmp_path):
    proc, result, truths = run_probe("rlaif_jax.eval.clip_probe", smoke_workdir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 frames, 3 clips" in proc.stdout and "| colour_start |" in proc.stdout
    shapes = sum(len(t["objects"]) for name, t in truths.items() if name.startswith("eval_"))
    assert sum(r["n"] for r in result["rows"] if r["type"] == "colour_start") == shapes
    assert all(0.0 <= r["whole"] <= 1.0 and 0.0 <= r["clip"] <= 1.0 for r in result["rows"])
