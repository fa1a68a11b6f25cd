"""AI feedback mechanics on a tiny random video LLM over the synthetic world: both orders,
the margin, the output format, resume after a crash, the metrics."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from rlaif_jax.data import conversation, prompts
from rlaif_jax.data.builders import items_json
from rlaif_jax.data.pipeline import Pipeline
from rlaif_jax.data.synthetic import load_truth, text
from rlaif_jax.data.video import clip_frames
from rlaif_jax.feedback import judge
from rlaif_jax.feedback import records as feedback_records
from rlaif_jax.feedback import stage as feedback
from tests.support import feedback_settings, host_variables

BATCH = 4


@pytest.fixture(scope="module")
def engine(world_tokenizer):  # noqa: F811
    from rlaif_jax.models.clip_vision import ClipVisionConfig
    from rlaif_jax.models.llama import LlamaConfig
    from rlaif_jax.models.video_llm import VideoLLM, VideoLLMConfig

    tok = world_tokenizer
    config = VideoLLMConfig(
        vision=ClipVisionConfig(image_size=64, patch_size=32, hidden_size=32,
                                intermediate_size=64, num_layers=1, num_heads=2),
        llm=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        num_frames=8, image_token_id=conversation.image_token_id(tok))
    model = VideoLLM(config)
    variables = host_variables(model)
    # Sharper logits than a random init gives: this judge then shows a clear position bias.
    head = variables["params"]["llm"]["lm_head"]
    head["kernel"] = head["kernel"] * 30
    settings = feedback_settings(**{
        "sampling.max_new_tokens": 6, "sampling.temperature": 1.0,
        "context_sampling.max_new_tokens": 4, "context_sampling.temperature": 0.0,
        "prompt_bucket": 128, "num_clips": 3, "margin": 0.3, "max_judge_length": 512,
        "judge_reply": "label", "context": "describe"})
    return judge.AIFeedback(model, variables, tok, settings)


def test_clips_cut_the_frames_in_order_and_repeat_them_to_the_video_length():
    frames = np.arange(2 * 8).reshape(2, 8, 1, 1, 1)  # frame value = its index (+ 8 per video)
    clips = clip_frames(frames, 3)
    assert clips.shape == (6, 8, 1, 1, 1)
    # array_split: frames 0-2, 3-5, 6-7, each resampled to 8 by linspace (rounded down).
    np.testing.assert_array_equal(clips[0, :, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(clips[2, :, 0, 0, 0], [6, 6, 6, 6, 6, 6, 6, 7])
    np.testing.assert_array_equal(clips[3, :, 0, 0, 0], [8, 8, 8, 8, 9, 9, 9, 10])


def test_decide_averages_both_orders_and_drops_under_the_margin():
    assert judge.decide(np.array([0.9, 0.7]), 0.5) == pytest.approx((0.8, 1, 0.8, True))
    p1, preference, confidence, kept = judge.decide(np.array([0.6, 0.3]), 0.2)
    assert (preference, kept) == (2, False)
    assert p1 == pytest.approx(0.45) and confidence == pytest.approx(0.55)


ANSWERS = [("the square is red", "a blue circle moves left"), ("two", "three"), ("yes", "no"),
           ("left", "right")]


def _first_batch(engine, prompt_data):
    """(the prompt build's first batch, its video tokens, its question turns)."""
    pipe = Pipeline(prompt_data, "train", engine.tokenizer, BATCH, 256, shuffle=False)
    batch = pipe.batch(0)
    turns = [conversation.first_human_turn(feedback._turns(pipe.record(i)))
             for i in batch["index"]]
    return batch, engine.encode(batch["frames"]), turns


def _with_reply(engine, reply):
    settings = dataclasses.replace(engine.settings, judge_reply=reply)
    return judge.AIFeedback(engine.model, engine.variables, engine.tokenizer, settings)


@pytest.mark.parametrize("reply", prompts.PAIRWISE_REPLIES)
def test_judge_asks_both_orders_and_swapping_the_answers_mirrors_it(
        engine, prompt_data, reply):  # noqa: F811
    engine = _with_reply(engine, reply)
    batch, tokens, turns = _first_batch(engine, prompt_data)
    answers = ANSWERS
    contexts = ["Clip 1: a red square. Clip 2: it moves. Clip 3: it stops."] * BATCH
    p = engine.judge(engine.judge_rows(turns, answers, contexts), tokens, batch["has_video"])
    swapped = engine.judge(engine.judge_rows(turns, [(b, a) for a, b in answers], contexts),
                           tokens, batch["has_video"])
    assert p.shape == (BATCH, 2) and np.all((p > 0) & (p < 1))
    # Order (1, 2) of the swapped pair is order (2, 1) of the original: P(first-listed) there
    # is 1 - P(second-listed) here.
    np.testing.assert_allclose(swapped[:, 0], 1 - p[:, 1], atol=1e-5)
    np.testing.assert_allclose(swapped[:, 1], 1 - p[:, 0], atol=1e-5)
    # Column 1 is read from the judge prompt in the other order: P(second-listed choice), the
    # label "2" or, restated, answer 1's first own token, after the answers' common start.
    text = prompts.judge_prompt(judge.question_of(turns[0]),
                                answers[0][1], answers[0][0], contexts[0], reply)
    human = conversation.video_question(text)
    prompt_ids = conversation.tokenize_prompt(human, engine.tokenizer)
    if reply == "label":
        ids, choices = prompt_ids, np.asarray(conversation.judge_choice_token_ids(engine.tokenizer))
    else:
        ids, choices = judge.restated_choice(human, answers[0][1], answers[0][0],
                                                engine.tokenizer)
        answer_1 = conversation.tokenize_conversation(
            [human, {"from": "gpt", "value": answers[0][0]}], engine.tokenizer).input_ids
        assert list(ids[:len(prompt_ids)]) == list(prompt_ids)
        assert choices[1] == answer_1[len(ids)] and choices[0] != choices[1]
    logits = judge._last_logits(engine.model, engine.variables, ids[None],
                                   np.ones((1, len(ids)), np.int32), tokens[:1], np.ones(1, bool))
    picked = np.asarray(logits, np.float64)[0, choices]
    expected = np.exp(picked[1] - np.logaddexp(picked[0], picked[1]))
    np.testing.assert_allclose(expected, p[0, 1], atol=1e-5)
    # A too-long judge prompt is not judged.
    rows = engine.judge_rows(turns, [("word " * 400, "x")] + answers[1:], contexts)
    assert rows[0] is None and rows[1] is not None
    assert np.isnan(engine.judge(rows, tokens, batch["has_video"])[0]).all()


def test_feedback_resumes_after_a_crash_and_writes_the_reference_format(
        engine, prompt_data, world_dir, tmp_path):  # noqa: F811
    pipe = Pipeline(prompt_data, "train", engine.tokenizer, BATCH, 256, shuffle=False)
    with open(os.path.join(world_dir, "ppo_prompts.json")) as f:
        items = {str(i["uid"]): i for i in json.load(f)}
    truths = load_truth(world_dir)
    out = str(tmp_path / "part.jsonl")
    rng = jax.random.PRNGKey(0)
    first = feedback.run_batches(engine, pipe, items, out, rng, truths, progress=False,
                                 stop_after=1)  # "crashes" after one batch
    assert len(first) == BATCH
    with open(out, "a") as f:
        f.write('{"id": "cut by the cra')  # a line the crash cut short
    records = feedback.run_batches(engine, pipe, items, out, rng, truths, progress=False)
    assert len(records) == pipe.num_examples == len(items)
    assert sorted(r["id"] for r in records) == sorted(items)  # each prompt once
    assert records[:BATCH] == first  # finished work is kept, not redone
    for r in records:
        assert r["context"].startswith("Clip 1:") and "Clip 3:" in r["context"]
        assert r["true_preference"] in (1, 2) and len(r["true_scores"]) == 2
        if r["p_output_1"] is not None:
            assert abs(np.mean(r["p_orders"]) - r["p_output_1"]) < 1e-9
            assert 0 <= r["p_output_1_no_context"] <= 1
    judged = [r for r in records if r["p_output_1"] is not None]
    assert judged
    # This random judge gives the same label whatever the order (position bias): asking both
    # orders cancels it, so at margin 0.3 no pair is kept...
    label_1 = [(r["p_orders"][0] > 0.6 and r["p_orders"][1] < 0.4) for r in judged]
    label_2 = [(r["p_orders"][0] < 0.4 and r["p_orders"][1] > 0.6) for r in judged]
    assert all(label_1) or all(label_2)
    assert not any(r["kept"] for r in judge.apply_margin(records, 0.3))
    metrics = feedback_records.summarize(records, 0.3)
    assert metrics["feedback/prompts"] == len(items) and metrics["feedback/kept"] == 0
    assert metrics["feedback/dropped_under_margin"] == len(judged)
    # ...and at margin 0 every judged pair is, written in the reference's format.
    kept = [feedback_records.preference_item(r) for r in judge.apply_margin(records, 0.0)
            if r["kept"]]
    assert len(kept) == len(judged)
    for item in kept:
        assert items_json.check_item(item, "preference", has_video=True) is None
        assert item["conversations"][0]["value"].startswith(prompts.IMAGE_TOKEN)
        assert 0.5 <= item["confidence"] <= 1 and item["preference"] in (1, 2)
    metrics = feedback_records.summarize(records, 0.0)
    assert metrics["feedback/kept"] == len(kept)
    assert 0 <= metrics["feedback/agreement_with_truth"] <= 1
    assert 0 <= metrics["feedback/agreement_with_truth_no_context"] <= 1


@pytest.mark.parametrize("with_context", [True, False])
def test_the_likelihood_judge_compares_each_answers_mean_token_logprob(
        engine, prompt_data, with_context):  # noqa: F811
    engine = _with_reply(engine, "likelihood")
    batch, tokens, turns = _first_batch(engine, prompt_data)
    answers = ANSWERS
    contexts = (["Clip 1: a red square. Clip 2: it moves. Clip 3: it stops."] * BATCH
                if with_context else None)
    p = engine.judge(engine.judge_rows(turns, answers, contexts), tokens, batch["has_video"])
    swapped = engine.judge(engine.judge_rows(turns, [(b, a) for a, b in answers], contexts),
                           tokens, batch["has_video"])
    assert p.shape == (BATCH, 2) and np.all((p > 0) & (p < 1))
    np.testing.assert_array_equal(p[:, 0], p[:, 1])  # no order: one reading
    np.testing.assert_allclose(swapped, 1 - p, atol=1e-6)
    # Row 0 by hand: each answer after the video, the context and the question, one at a time
    # (unpadded), the mean log-prob of its tokens and end-of-turn token.
    question = prompts.question_with_context(judge.question_of(turns[0]),
                                             contexts[0] if with_context else None)
    assert ("Here is a detailed description" in question) == with_context
    means = []
    for answer in answers[0]:
        row = conversation.tokenize_conversation(
            [conversation.video_question(question), {"from": "gpt", "value": answer}],
            engine.tokenizer)
        logits = engine.model.apply(engine.variables, row.input_ids[None],
                                    np.ones((1, len(row.input_ids)), np.int32),
                                    has_video=np.ones(1, bool), video_tokens=tokens[:1]).logits
        logp = jax.nn.log_softmax(np.asarray(logits[0, :-1], np.float64), axis=-1)
        picked = np.asarray(logp)[np.arange(len(row.input_ids) - 1), row.input_ids[1:]]
        scored = row.labels[1:] != conversation.IGNORE_INDEX
        assert row.labels[-1] == engine.tokenizer.eos_token_id  # the end-of-turn counts
        means.append(picked[scored].mean())
    np.testing.assert_allclose(p[0, 0], 1 / (1 + np.exp(means[1] - means[0])), atol=1e-5)
    # Too long for max_judge_length: not judged.
    rows = engine.judge_rows(turns, [("word " * 600, "x")] + answers[1:], contexts)
    assert rows[0] is None and rows[1] is not None
    assert np.isnan(engine.judge(rows, tokens, batch["has_video"])[0]).all()


def test_a_restating_judge_reads_where_the_answers_first_differ(world_tokenizer):  # noqa: F811
    human = conversation.video_question(
        prompts.judge_prompt("How many shapes are there?", "There are two shapes.",
                             "There are three shapes.", None, "restate"))
    ids, choices = judge.restated_choice(human, "There are two shapes.",
                                            "There are three shapes.", world_tokenizer)
    text = world_tokenizer.decode(ids.tolist())
    assert text.endswith("Reply with the better answer. ASSISTANT: There are"), text[-80:]
    assert [world_tokenizer.decode([c]).strip() for c in choices] == ["two", "three"]
    # One answer the start of the other: the shorter one's choice is its end-of-turn token.
    _, choices = judge.restated_choice(human, "two", "two shapes", world_tokenizer)
    assert choices[0] == world_tokenizer.eos_token_id
    _, choices = judge.restated_choice(human, "two", "two", world_tokenizer)  # same tokens
    assert choices[0] == choices[1]  # a tie: log_softmax over the two gives 1/2 each


def test_pairs_are_the_first_two_distinct_samples_by_text_alone():
    assert judge.distinct_pair(["red", " red", "blue", "green"]) == ("red", "blue")
    assert judge.distinct_pair(["two", "two"]) == ("two", "two")  # dropped as identical


def test_question_context_asks_each_clip_the_prompts_question(engine, monkeypatch):
    engine = judge.AIFeedback(engine.model, engine.variables, engine.tokenizer,
                              dataclasses.replace(engine.settings, context="question"))
    seen = {}
    monkeypatch.setattr(engine, "encode", lambda frames: seen.setdefault("frames", frames))

    def generate(input_ids, attention_mask, video_tokens, has_video, rng, sampling):
        seen["prompts"] = [engine.tokenizer.decode(ids[mask.astype(bool)])
                           for ids, mask in zip(input_ids, attention_mask)]
        return [f"answer {i}" for i in range(len(input_ids))]

    monkeypatch.setattr(engine, "_generate", generate)
    frames = np.arange(2 * 8).reshape(2, 8, 1, 1, 1).astype(np.uint8)
    questions = ["What colour is the square at the end?", "How many shapes are in the video?"]
    contexts = engine.clip_context(frames, questions, jax.random.PRNGKey(0))
    assert contexts == ["Clip 1: answer 0. Clip 2: answer 1. Clip 3: answer 2.",
                        "Clip 1: answer 3. Clip 2: answer 4. Clip 3: answer 5."]
    assert prompts.split_clip_descriptions(contexts[1]) == ["answer 3.", "answer 4.", "answer 5."]
    # Row 3 * video + clip asks video's question of that clip's frames only.
    assert [q in p for q, p in zip([questions[0]] * 3 + [questions[1]] * 3, seen["prompts"])]
    np.testing.assert_array_equal(seen["frames"], clip_frames(frames, 3))
    assert all(p.count(q) == 1 for q, p in zip([questions[0]] * 3 + [questions[1]] * 3,
                                                seen["prompts"]))


def test_named_clip_context_asks_only_the_clip_a_time_phrase_names(engine, monkeypatch):
    engine = judge.AIFeedback(engine.model, engine.variables, engine.tokenizer,
                              dataclasses.replace(engine.settings, context="named_clip"))
    seen = {"calls": 0}

    def encode(frames):
        seen["frames"] = frames
        return frames

    def generate(input_ids, attention_mask, video_tokens, has_video, rng, sampling):
        seen["calls"] += 1
        seen["prompts"] = [engine.tokenizer.decode(ids[mask.astype(bool)])
                           for ids, mask in zip(input_ids, attention_mask)]
        return [f"answer {i}" for i in range(len(input_ids))]

    monkeypatch.setattr(engine, "encode", encode)
    monkeypatch.setattr(engine, "_generate", generate)
    frames = np.arange(3 * 8).reshape(3, 8, 1, 1, 1).astype(np.uint8)
    questions = ["What colour is the square at the end?", "How many shapes are in the video?",
                 "Which colour does the circle have at the start?"]
    contexts = engine.named_clip_context(frames, questions, jax.random.PRNGKey(0))
    assert contexts == ["Clip 3: answer 0.", None, "Clip 1: answer 2."]
    clips = clip_frames(frames, 3)  # video i's clip k at row 3 * i + k
    np.testing.assert_array_equal(seen["frames"], clips[[2, 3, 6]])  # row 1: a filler
    assert all(q in p for q, p in zip(questions, seen["prompts"]))
    assert engine.named_clip_context(frames, questions[1:2] * 3, None) == [None] * 3
    assert seen["calls"] == 1  # no question named a clip: nothing generated


def test_a_time_phrase_names_one_clip():
    assert prompts.clip_named_by("What colour is the circle at the end?", 3) == 2
    assert prompts.clip_named_by("Which colour does the star have at the start?", 3) == 0
    assert prompts.clip_named_by("What happens in the middle?", 3) == 1
    assert prompts.clip_named_by("What happens at the beginning?", 4) == 0
    assert prompts.clip_named_by("What happens in the middle?", 4) == 2
    assert prompts.clip_named_by("When does the circle change colour?", 3) is None
    assert prompts.clip_named_by("Is it red at the start and blue at the end?", 3) is None
    context = prompts.join_clip_descriptions(["blue then red", "no star"], [2, 3])
    assert context == "Clip 2: blue then red. Clip 3: no star."
    assert prompts.numbered_clip_descriptions(context) == [(2, "blue then red."), (3, "no star.")]


def test_clip_answers_are_graded_against_each_clips_truth(world_dir):  # noqa: F811
    truths = load_truth(world_dir)
    name = next(n for n, t in truths.items() if any(o["change_frame"] for o in t["objects"]))
    shape = next(o["shape"] for o in truths[name]["objects"] if o["change_frame"])
    question = f"What colour is the {shape} at the end?"
    right = text.clip_answers(truths[name], text.parse_question(question))
    wrong = right[:2] + ["no " + shape]
    images = f"videos/{name}.mp4"
    grade = lambda answers: feedback_records.clip_answer_grades(  # noqa: E731
        truths, images, question, prompts.join_clip_descriptions(answers))
    assert grade(right) == {"clip_answers_correct": [True, True, True]}
    assert grade(wrong) == {"clip_answers_correct": [True, True, False]}
    named = lambda answer: feedback_records.clip_answer_grades(  # noqa: E731
        truths, images, question, prompts.join_clip_descriptions([answer], [3]))
    assert named(right[2]) == {"clip_answers_correct": [True]}  # graded against clip 3
    assert named(right[2] + " then " + right[2]) == {"clip_answers_correct": [False]}
    assert feedback_records.clip_answer_grades(truths, images, "Describe this video in detail.",
                                               "Clip 1: x. Clip 2: y. Clip 3: z.") == {}
    records = [{"question_turn": conversation.video_question(question),
                "clip_answers_correct": hits} for hits in ([True, True, True], [True, True, False])]
    out = feedback_records.clip_answer_accuracy(records)
    assert out["feedback/clip_answer_accuracy/colour_end"] == pytest.approx(5 / 6)
    assert out["feedback/clip_answer_accuracy/all_n"] == 6


def test_time_localised_agreement_pairs_the_two_judges_on_decisive_temporal_pairs():
    def record(question, p_ctx, p_none, truth, scores=(1.0, 0.0)):
        return {"question_turn": conversation.video_question(question), "context_mode": "question",
                "p_output_1": p_ctx, "p_output_1_no_context": p_none, "true_preference": truth,
                "true_scores": list(scores)}

    end = "What colour is the square at the end?"
    records = [record(end, 0.9, 0.2, 1), record(end, 0.8, 0.7, 1), record(end, 0.1, 0.6, 2),
               record("When does the circle appear?", 0.3, 0.4, 1),
               record(end, 0.9, 0.1, 1, scores=(0.5, 0.5)),  # a tie of the truth: left out
               record("What colour is the square?", 0.9, 0.1, 1)]  # not time-localised
    out = feedback_records.time_localised_agreement(records)
    assert out["feedback/pairs_time_localised"] == 4
    assert out["feedback/agreement_with_truth_time_localised"] == 0.75
    assert out["feedback/agreement_with_truth_no_context_time_localised"] == 0.25
    gain = np.array([1, 0, 1, 0], float)
    assert out["feedback/agreement_gain_se_time_localised"] == pytest.approx(
        np.sqrt(np.var(gain, ddof=1) / 4))


@pytest.mark.parametrize("context,reply", [("question", "label"), ("describe", "label"),
                                           ("question", "likelihood"),
                                           ("named_clip", "likelihood")])
def test_contexts_and_verdicts_never_see_the_truth(engine, prompt_data, world_dir, tmp_path,
                                                   context, reply):  # noqa: F811
    """The RL prompts' truth only grades: shuffled, contexts and judge verdicts are the same."""
    engine = judge.AIFeedback(engine.model, engine.variables, engine.tokenizer,
                              dataclasses.replace(engine.settings, context=context,
                                                  judge_reply=reply))
    pipe = Pipeline(prompt_data, "train", engine.tokenizer, BATCH, 256, shuffle=False)
    with open(os.path.join(world_dir, "ppo_prompts.json")) as f:
        items = {str(i["uid"]): i for i in json.load(f)}
    question_of_id = {uid: item["conversations"][0]["value"] for uid, item in items.items()}
    truths = load_truth(world_dir)
    names = sorted(truths)
    shuffled = dict(zip(names, [truths[n] for n in names[1:] + names[:1]]))
    runs = []
    for index, given in enumerate((truths, shuffled)):
        records = feedback.run_batches(engine, pipe, items, str(tmp_path / f"{index}.jsonl"),
                                       jax.random.PRNGKey(0), given, progress=False,
                                       stop_after=2)
        runs.append([{k: r.get(k) for k in ("id", "answers", "context", "p_orders",
                                             "p_output_1_no_context")} for r in records])
    assert json.dumps(runs[0]) == json.dumps(runs[1])
    if context == "named_clip":  # a context only where the question names a clip
        assert all((r["context"] is None) == (prompts.clip_named_by(
            question_of_id[r["id"]], 3) is None) for r in runs[0])
    else:
        assert all(r["context"].startswith("Clip 1:") for r in runs[0])
