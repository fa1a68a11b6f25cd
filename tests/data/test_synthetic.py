"""The synthetic world: determinism, its files and formats, its tokenizer, and the scorer."""
import collections
import hashlib
import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.support import WORLD_ARGS, hand_made_truth
from rlaif_jax.data import conversation, prompts
from rlaif_jax.data.synthetic import (answerable_specs, generate_rl_split, generate_world,
                                      load_truth, parse_question, preference, question_text,
                                      score_answer, true_answer)
from rlaif_jax.data.synthetic import generate, text, world


def _digest(folder: str) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_same_seed_same_bytes(tmp_path):
    args = dict(num_train=3, num_eval=1, frames=8, size=32, progress=False)
    generate_world(str(tmp_path / "a"), seed=5, **args)
    generate_world(str(tmp_path / "b"), seed=5, **args)
    generate_world(str(tmp_path / "c"), seed=6, **args)
    a, b, c = (_digest(str(tmp_path / x)) for x in "abc")
    videos = [k for k in a if k.endswith(".mp4")]
    assert len(videos) == 4 * 4  # 4 videos, each with 3 clips
    assert a == b
    assert any(a[k] != c[k] for k in videos)


def test_sizes_decord_cannot_read_are_refused(tmp_path):
    with pytest.raises(ValueError, match="decord"):
        generate_world(str(tmp_path), num_train=1, num_eval=1, size=48, progress=False)


def test_world_files_and_formats(world_dir):
    manifest = json.load(open(os.path.join(world_dir, "manifest.json")))
    assert all(n > 0 for n in manifest["counts"].values()), manifest["counts"]
    load = lambda key: json.load(open(os.path.join(world_dir, f"{key}.json")))  # noqa: E731
    for key in ("sft_short", "sft_long", "sft_judge", "policy_init"):
        for item in load(key):
            human, gpt = item["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n")
            assert gpt["from"] == "gpt" and gpt["value"]
            assert os.path.isfile(os.path.join(world_dir, item["images"]))
    short_words = max(len(i["conversations"][1]["value"].split()) for i in load("sft_short"))
    long_words = np.mean([len(i["conversations"][1]["value"].split()) for i in load("sft_long")])
    assert short_words <= 4 and long_words > 10  # the two curriculum stages
    assert {i["conversations"][1]["value"] for i in load("sft_judge")} <= {"1", "2"}
    for pair in load("preferences_oracle"):
        assert pair["preference"] in (1, 2) and pair["output_1"]["value"] != pair["output_2"]["value"]
        better = pair["true_scores"][pair["preference"] - 1]
        assert pair["true_preference"] == pair["preference"] and better > min(pair["true_scores"])
    assert all({"uid", "images", "conversations"} <= set(p) for p in load("ppo_prompts"))
    assert all(set(q) == {"video_name", "question_id", "question", "answer"} for q in load("eval_qa"))
    assert all(set(q) == {"video_name", "Q", "A"} for q in load("eval_generic") + load("eval_temporal"))
    assert all(set(q) == {"video_name", "Q1", "Q2", "A"} for q in load("eval_consistency"))
    descriptions = json.load(open(os.path.join(world_dir, "descriptions.json")))
    truth = load_truth(world_dir)
    assert set(descriptions) == set(truth)
    assert sum(n.startswith("eval_") for n in truth) == WORLD_ARGS["num_eval"]
    for entry in descriptions.values():
        assert len(entry["clips"]) == 3
        assert entry["context"] == prompts.join_clip_descriptions(entry["clips"])


def test_tokenizer_special_tokens(world_dir, world_tokenizer):
    tok = AutoTokenizer.from_pretrained(os.path.join(world_dir, "tokenizer"))
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    image_id = tok.convert_tokens_to_ids("<image>")
    assert conversation.image_token_id(tok) == image_id < len(tok)
    assert tok("<image>\nWhat colour", add_special_tokens=False)["input_ids"][0] == image_id
    assert tok("red")["input_ids"][0] == tok.bos_token_id
    assert 300 < len(tok) <= 1100
    one, two = conversation.judge_choice_token_ids(tok)
    assert one != two and tok.decode([one]).strip() == "1" and tok.decode([two]).strip() == "2"
    # The template's system sentence is one token; the rest of a row is tokenised as by the BPE
    # alone, and the row decodes back to its text.
    text, _ = conversation.render([conversation.video_question("What colour is the square?"),
                                   {"from": "gpt", "value": "red"}])
    ids = tok(text)["input_ids"]
    assert ids[1] == tok.convert_tokens_to_ids(prompts.VICUNA_V1_SYSTEM)
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    rest = text[len(prompts.VICUNA_V1_SYSTEM):]
    assert ids[2:] == tok(rest, add_special_tokens=False)["input_ids"]


# A known video: a red square moving right; a yellow circle appears in the middle, moves up and
# turns blue at the end.
KNOWN = {
    "name": "known", "num_frames": 8, "size": 64, "fps": 4,
    "objects": [
        {"shape": "square", "colour": "red", "new_colour": None, "change_frame": None,
         "motion": "right", "appear_frame": 0, "start": [12.0, 20.0], "radius": 7.0},
        {"shape": "circle", "colour": "yellow", "new_colour": "blue", "change_frame": 6,
         "motion": "up", "appear_frame": 3, "start": [40.0, 50.0], "radius": 7.0},
    ],
}
KNOWN["events"] = world.list_events(KNOWN)

SHORT_CASES = [
    ("What colour is the square?", "red", True),
    ("What colour is the square?", "It is red.", True),
    ("What colour is the square?", "blue", False),
    ("What colour is the square?", "red or blue", False),
    ("Which way does the square move?", "It moves to the right.", True),
    ("Which way does the square move?", "left", False),
    ("In which direction does the circle move?", "up", True),
    ("Which way does the circle move?", "It doesn't move.", False),
    ("How many shapes are in the video?", "two", True),
    ("How many shapes are in the video?", "There are 2 shapes.", True),
    ("How many shapes are in the video?", "three", False),
    ("When does the circle appear?", "in the middle", True),
    ("When does the circle appear?", "at the end", False),
    ("What colour is the circle at the end?", "blue", True),
    ("What colour is the circle at the end?", "yellow", False),
    ("What happens first?", "the circle appeared", True),
    ("What happens first?", "The circle turned blue.", False),
    ("When does the circle change colour?", "at the end", True),
]


@pytest.mark.parametrize("question,answer,expected", SHORT_CASES)
def test_scorer_short_answers(question, answer, expected):
    result = score_answer(KNOWN, question, answer)
    assert result.correct is expected
    assert result.score == float(expected)


def test_scorer_descriptions():
    truth_text = ("There are two shapes. A red square moves right. Then a yellow circle appears "
                  "in the middle and moves up. Then the circle changes from yellow to blue at "
                  "the end.")
    perfect = score_answer(KNOWN, "Describe this video in detail.", truth_text)
    assert perfect.correct and (perfect.correctness, perfect.detail, perfect.temporal) == (1, 1, 1)
    wrong_colour = score_answer(KNOWN, "Describe this video in detail.",
                                truth_text.replace("red square", "green square"))
    assert wrong_colour.correctness < 1 and wrong_colour.detail < 1 and wrong_colour.temporal == 1
    hallucinated = score_answer(KNOWN, "What happens in this video?",
                                truth_text + " A white triangle moves left.")
    assert hallucinated.correctness < 1 and hallucinated.detail == 1
    wrong_order = score_answer(KNOWN, "Describe this video in detail.",
                               "A red square moves right. First the circle changes from yellow "
                               "to blue. Then a yellow circle appears.")
    assert wrong_order.temporal < 1
    terse = score_answer(KNOWN, "Describe this video in detail.", "A red square moves right.")
    assert terse.correctness == 1 and terse.detail < 0.5 and terse.temporal == 0
    assert score_answer(KNOWN, "Describe this video in detail.", "I do not know.").score == 0


def test_preference_prefers_truth_then_concision():
    question = "What colour is the square?"
    assert preference(KNOWN, question, "red", "blue") == 1
    assert preference(KNOWN, question, "blue", "red") == 2
    assert preference(KNOWN, question, "It is red, it is red.", "red") == 2  # a tie: concise wins
    describe = "Describe this video in detail."
    assert preference(KNOWN, describe, "A red square moves right.",
                      "A red square moves left. A white triangle appears.") == 1


def test_questions_parse_back_and_true_answers_score_right(world_dir):
    for name, truth in load_truth(world_dir).items():
        for spec in answerable_specs(truth):
            for paraphrase in range(3):
                text = question_text(spec, paraphrase)
                assert parse_question(text) == spec, text
            assert score_answer(truth, question_text(spec), true_answer(truth, spec)).correct


def test_judge_items_agree_with_the_scorer(world_dir):
    truth = load_truth(world_dir)
    items = json.load(open(os.path.join(world_dir, "sft_judge.json")))
    assert items
    for item in items:
        prompt = item["conversations"][0]["value"]
        question = prompt.split("\nQuestion: ")[1].split("\n")[0]
        answer_1 = prompt.split("\nAnswer 1: ")[1].split("\nAnswer 2: ")[0]
        answer_2 = prompt.split("\nAnswer 2: ")[1].split("\nWhich answer is better?")[0]
        name = item["id"].rsplit("_judge", 1)[0]
        expected = preference(truth[name], question, answer_1, answer_2)
        assert item["conversations"][1]["value"] == str(expected)
        # Every pair comes with the true context and without any (the no-context ablation).
        assert ("description of the video" in prompt) != item["id"].endswith("_nocontext")
    with_context = {i["id"] for i in items if not i["id"].endswith("_nocontext")}
    assert {i["id"] for i in items} - with_context == {f"{x}_nocontext" for x in with_context}


def test_more_rl_videos_come_with_prompts_truth_and_oracle_pairs(tmp_path, world_tokenizer):
    counts = generate_rl_split(str(tmp_path), 3, frames=8, size=32, seed=5, progress=False)
    load = lambda key: json.load(open(os.path.join(tmp_path, f"{key}.json")))  # noqa: E731
    truth, prompts_, pairs = load("truth"), load("ppo_prompts"), load("preferences_oracle")
    assert counts == {"ppo_prompts": len(prompts_), "preferences_oracle": len(pairs)}
    assert len(truth) == 3 and len(pairs) >= 3
    assert all(1 < n <= 1 + generate.RL_SHORT_QUESTIONS for n in collections.Counter(
        p["images"] for p in prompts_).values())  # several short questions and the description
    for item in prompts_ + pairs:
        assert os.path.isfile(os.path.join(tmp_path, item["images"]))
        name = os.path.basename(item["images"])[:-len(".mp4")]
        question = item["conversations"][0]["value"].split("\n", 1)[1]
        assert parse_question(question) is not None
        if item in prompts_:  # the reference answer is the true one
            assert score_answer(truth[name], question, item["conversations"][1]["value"]).correct
    for pair in pairs:
        scores = pair["true_scores"]
        assert pair["preference"] == pair["true_preference"] == 1 + int(scores[1] > scores[0])
        for key in ("output_1", "output_2"):  # the world's tokenizer knows every word
            assert world_tokenizer.unk_token_id not in world_tokenizer(
                pair[key]["value"])["input_ids"]


def _changing_truth() -> dict:
    """A circle red from frame 0, blue from frame 5 (inside clip 2 of frames 3-5); a square,
    green, from frame 4; 8 frames cut into clips 0-2, 3-5, 6-7."""
    objects = [
        {"shape": "circle", "colour": "red", "new_colour": "blue", "change_frame": 5,
         "motion": "left", "appear_frame": 0, "start": [40.0, 20.0], "radius": 7.7},
        {"shape": "square", "colour": "green", "new_colour": None, "change_frame": None,
         "motion": "still", "appear_frame": 4, "start": [12.0, 50.0], "radius": 7.7}]
    return hand_made_truth(objects, name="t")


def test_clip_answers_say_what_each_clip_shows():
    truth = _changing_truth()
    assert world.clip_frame_ranges(8) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    circle, square = {"shape": "circle"}, {"shape": "square"}
    for kind in ("colour_start", "colour_end", "change_when"):
        assert text.clip_answers(truth, {"type": kind, **circle}) == ["red", "red then blue",
                                                                      "blue"]
    assert text.clip_answers(truth, {"type": "appear_when", **square}) == ["no square", "green",
                                                                           "green"]
    assert text.clip_answers(truth, {"type": "motion", **square}) == [
        "no square", "it does not move", "it does not move"]
    assert text.clip_answers(truth, {"type": "count"}) == ["one", "two", "two"]
    assert text.clip_answers(truth, {"type": "shape_of_colour", "colour": "green"}) == [
        "none", "the square", "the square"]
    # Questions about the order of events are answered by each clip's description.
    for spec in ({"type": "first_event"}, {"type": "describe"}):
        assert text.clip_answers(truth, spec) == text.describe_clips(truth)
    rng = np.random.default_rng(0)
    for spec in ({"type": "colour_end", **circle}, {"type": "count"}, {"type": "motion", **square},
                 {"type": "shape_of_colour", "colour": "green"}, {"type": "first_event"}):
        for frames in world.clip_frame_ranges(8):
            for _ in range(5):
                assert (text.wrong_clip_answer(truth, spec, frames, rng)
                        != text.clip_answer(truth, spec, frames))


def _slots(context: str) -> list[str]:
    parts = context.split("Clip ")[1:]
    return [p.split(": ", 1)[1].strip().rstrip(".") for p in parts]


def _context_row(item: dict, id_marker: str) -> tuple[str, str, str, str]:
    """(video name, the context after its lead, the question, the target) of a row that reads
    a context in front of a question."""
    human, gpt = item["conversations"]
    context, question = human["value"].split("\nQuestion: ")
    lead = "<image>\n" + prompts.CONTEXT_LEAD
    assert context.startswith(lead)
    return item["id"].rsplit(id_marker, 1)[0], context[len(lead):], question, gpt["value"]


def test_clip_and_context_rows(world_dir):
    """SFT rows for the judge's skills: a clip and a question asked of it with what the clip
    shows; the video, its clip answers (some corrupted) as context, and the true answer."""
    truth = load_truth(world_dir)
    ranges = world.clip_frame_ranges(WORLD_ARGS["frames"])
    clip_rows = json.load(open(os.path.join(world_dir, "sft_clip.json")))
    assert clip_rows
    for item in clip_rows:
        name, clip = item["images"].rsplit("/", 1)[1][:-len(".mp4")].rsplit("_clip", 1)
        assert os.path.isfile(os.path.join(world_dir, item["images"]))
        human, gpt = item["conversations"]
        lead = "<image>\n" + prompts.CLIP_QUESTION_LEAD + " "
        assert human["value"].startswith(lead)
        spec = parse_question(human["value"][len(lead):])
        assert gpt["value"] == text.clip_answer(truth[name], spec, ranges[int(clip)])
    context_rows = json.load(open(os.path.join(world_dir, "sft_context.json")))
    assert context_rows
    slots = corrupted = 0
    for item in context_rows:
        name, context, question, target = _context_row(item, "_context")
        spec = parse_question(question)
        assert target == true_answer(truth[name], spec)
        right = [a.rstrip(".") for a in text.clip_answers(truth[name], spec)]
        given = _slots(context)
        assert len(given) == len(right) == 3
        slots += 3
        corrupted += sum(g != r for g, r in zip(given, right))
    # 12 videos x 3 rows x 3 slots at P_CORRUPT_CLIP_ANSWER = 0.25
    assert 0 < corrupted < slots / 2, (corrupted, slots)


def test_named_clip_context_rows_give_the_clip_the_question_names(world_dir):
    """Every wording of every question whose time phrase names a clip, with that clip's answer
    (some corrupted) as the context and the true answer as the target."""
    truth = load_truth(world_dir)
    ranges = world.clip_frame_ranges(WORLD_ARGS["frames"])
    rows = json.load(open(os.path.join(world_dir, "sft_named_context.json")))
    sft_videos = {i["images"] for i in json.load(open(os.path.join(world_dir, "sft_short.json")))}
    expected = {(name, text.question_text(spec, k)) for name, t in truth.items()
                if generate.video_path(name) in sft_videos
                for spec in text.answerable_specs(t)
                for k in range(len(text.QUESTION_TEMPLATES[spec["type"]]))
                if spec["type"] in ("colour_start", "colour_end")}
    seen, corrupted = set(), 0
    for item in rows:
        name, context, question, target = _context_row(item, "_namedcontext")
        spec = parse_question(question)
        clip = prompts.clip_named_by(question, len(ranges))
        assert clip == (0 if spec["type"] == "colour_start" else 2)
        [(number, given)] = prompts.numbered_clip_descriptions(context)
        assert number == clip + 1
        corrupted += given.rstrip(".") != text.clip_answer(truth[name], spec, ranges[clip])
        assert target == true_answer(truth[name], spec)
        seen.add((name, question))
    assert seen == expected and len(rows) == len(expected) > 4
    assert 0 < corrupted < len(rows) * 0.7, (corrupted, len(rows))


def test_rl_prompts_draw_motion_less_often():
    rng = np.random.default_rng(0)
    drawn, answerable = collections.Counter(), collections.Counter()
    for index in range(300):
        truth = world.sample_truth(rng, f"v{index}", 8, 64, 4)
        specs = generate._rl_prompt_specs(truth, rng)
        assert specs[-1] == {"type": "describe"} and len(specs) <= 1 + generate.RL_SHORT_QUESTIONS
        shorts = [json.dumps(s, sort_keys=True) for s in specs[:-1]]
        assert len(set(shorts)) == len(shorts)  # distinct questions
        drawn.update(s["type"] == "motion" for s in specs[:-1])
        answerable.update(s["type"] == "motion" for s in answerable_specs(truth)
                          if s["type"] != "describe")
    share = lambda c: c[True] / (c[True] + c[False])  # noqa: E731
    assert share(drawn) < 0.6 * share(answerable), (share(drawn), share(answerable))
