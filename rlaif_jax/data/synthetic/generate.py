"""Writes a synthetic world: videos, their truth, every JSON file the stages read, a tokenizer.

Layout of a world directory (paths in items are relative to it, so it is its own video root):

    videos/{name}.mp4, videos/clips/{name}_clip{i}.mp4   H.264, the clips are the feedback stage's
    truth.json                 {name: truth}
    descriptions.json          {name: {"description", "clips": [...], "context"}}
    sft_short.json, sft_long.json, sft_judge.json        SFT curriculum (short, long) + judging
    sft_clip.json, sft_context.json      SFT rows: clip answers, answers read from a clip context
    sft_named_context.json     SFT rows: answers read from the clip a question's time phrase names
    policy_init.json, ppo_prompts.json, preferences_oracle.json   on held-out training videos
    eval_qa.json, eval_generic.json, eval_temporal.json, eval_consistency.json   on eval videos
    tokenizer/                 AutoTokenizer.from_pretrained(world/tokenizer)
    manifest.json              the arguments, the paths above and item counts
"""
from __future__ import annotations

import json
import os

import numpy as np
from tqdm import tqdm

from rlaif_jax.data import conversation, prompts
from rlaif_jax.data.conversation import video_question
from rlaif_jax.data.synthetic import render, scorer, text, tokenizer, world
from rlaif_jax.data.video import decode_video_file

FPS = 4
RL_FRACTION = 0.3  # training videos kept out of SFT: policy init, PPO prompts, oracle pairs
# PPO prompts of an RL video: this many short questions and the description. Questions about
# motion, which the tiny model does not see (its answers are at the blind level), are drawn
# this much less often than the others, so that pairs mostly differ in what can be judged.
RL_SHORT_QUESTIONS = 3
RL_MOTION_WEIGHT = 0.25
# SFT rows of each SFT video that teach the judge's skills (docs/data.md): clip answers (a clip
# as the input, `prompts.clip_question`) and context reading (the video, its clip answers as
# context, then the question); a share of the context's clip answers is replaced by a wrong one,
# so that the model weighs the context against the video instead of copying it.
SFT_CLIP_ROWS = 6
SFT_CONTEXT_ROWS = 8
P_CORRUPT_CLIP_ANSWER = 0.35
JSON_FILES = ("sft_short", "sft_long", "sft_clip", "sft_context", "sft_named_context",
              "sft_judge", "policy_init",
              "ppo_prompts", "preferences_oracle", "eval_qa", "eval_generic", "eval_temporal",
              "eval_consistency")


def video_path(name: str) -> str:
    return f"videos/{name}.mp4"


def video_name(path: str) -> str:
    """The video a record's `images` path names (the inverse of `video_path`)."""
    return os.path.splitext(os.path.basename(path))[0]


def clip_path(name: str, clip: int) -> str:
    return f"videos/clips/{name}_clip{clip}.mp4"


def _conversation(question: str, answer: str) -> list[dict]:
    return [video_question(question), {"from": "gpt", "value": answer}]


def _pick_paraphrase(rng: np.random.Generator, spec: dict) -> int:
    """Mostly the canonical wording, sometimes another, so that wording does not matter."""
    return 0 if rng.random() < 0.7 else int(rng.integers(len(text.QUESTION_TEMPLATES[spec["type"]])))


def _instruction_items(truth: dict, rng: np.random.Generator, max_short: int
                       ) -> tuple[list[dict], list[dict]]:
    """(short-answer items, long-answer items) of one video."""
    name = truth["name"]
    specs = [s for s in text.answerable_specs(truth) if s["type"] != "describe"]
    chosen = [specs[i] for i in rng.permutation(len(specs))[:max_short]]
    short = [{"id": f"{name}_short{k}", "images": video_path(name),
              "conversations": _conversation(text.question_text(s, _pick_paraphrase(rng, s)),
                                             text.true_answer(truth, s))}
             for k, s in enumerate(chosen)]
    describe = {"type": "describe"}
    long = [{"id": f"{name}_long", "images": video_path(name),
             "conversations": _conversation(text.question_text(describe, _pick_paraphrase(rng, describe)),
                                            text.describe(truth))}]
    for clip, clip_text in enumerate(text.describe_clips(truth)):
        long.append({"id": f"{name}_clip{clip}", "images": clip_path(name, clip),
                     "conversations": _conversation(prompts.context_prompt(), clip_text)})
    return short, long


def _answer_pair(truth: dict, spec: dict, rng: np.random.Generator):
    """A true and a wrong answer in random order, with the scorer's preference and scores;
    None on a tie."""
    answers = [text.true_answer(truth, spec), text.wrong_answer(truth, spec, rng)]
    if rng.random() < 0.5:
        answers.reverse()
    question = text.question_text(spec)
    scores = [scorer.score_answer(truth, spec, a).score for a in answers]
    if scores[0] == scores[1]:
        return None
    return question, answers[0], answers[1], scorer.preference(truth, spec, *answers), scores


def _pair_specs(truth: dict, rng: np.random.Generator) -> list[dict]:
    """One short question and the description question."""
    shorts = [s for s in text.answerable_specs(truth) if s["type"] != "describe"]
    return [shorts[int(rng.integers(len(shorts)))], {"type": "describe"}]


def _judge_items(truth: dict, context: str, rng: np.random.Generator) -> list[dict]:
    """Each pair twice: judged with the video's true context and without one, the two prompts
    of the feedback stage (context='clips' and its no-context ablation)."""
    items = []
    for k, spec in enumerate(_pair_specs(truth, rng)):
        pair = _answer_pair(truth, spec, rng)
        if pair is None:
            continue
        question, answer_1, answer_2, better, _ = pair
        for suffix, given in (("", context), ("_nocontext", None)):
            prompt = prompts.judge_prompt(question, answer_1, answer_2, given)
            items.append({"id": f"{truth['name']}_judge{k}{suffix}",
                          "images": video_path(truth["name"]),
                          "conversations": _conversation(prompt,
                                                         prompts.JUDGE_CHOICES[better - 1])})
    return items


def _rl_prompt_specs(truth: dict, rng: np.random.Generator) -> list[dict]:
    """RL_SHORT_QUESTIONS distinct short questions (motion drawn RL_MOTION_WEIGHT as often) and
    the description question."""
    shorts = [s for s in text.answerable_specs(truth) if s["type"] != "describe"]
    weights = np.array([RL_MOTION_WEIGHT if s["type"] == "motion" else 1.0 for s in shorts])
    count = min(RL_SHORT_QUESTIONS, len(shorts))
    chosen = rng.choice(len(shorts), size=count, replace=False, p=weights / weights.sum())
    return [shorts[int(i)] for i in chosen] + [{"type": "describe"}]


def _ppo_prompt_items(truth: dict, rng: np.random.Generator, first_uid: int) -> list[dict]:
    return [{"uid": first_uid + k, "images": video_path(truth["name"]),
             "conversations": _conversation(text.question_text(spec), text.true_answer(truth, spec))}
            for k, spec in enumerate(_rl_prompt_specs(truth, rng))]


def _clip_items(truth: dict, rng: np.random.Generator) -> list[dict]:
    """SFT_CLIP_ROWS rows of (one clip, a question asked of it, what the clip shows)."""
    name = truth["name"]
    specs = text.answerable_specs(truth)
    ranges = world.clip_frame_ranges(truth["num_frames"])
    items = []
    for k in range(SFT_CLIP_ROWS):
        spec = specs[int(rng.integers(len(specs)))]
        clip = int(rng.integers(len(ranges)))
        question = prompts.clip_question(text.question_text(spec, _pick_paraphrase(rng, spec)))
        items.append({"id": f"{name}_clipq{k}", "images": clip_path(name, clip),
                      "conversations": _conversation(
                          question, text.clip_answer(truth, spec, ranges[clip]))})
    return items


def _context_items(truth: dict, rng: np.random.Generator) -> list[dict]:
    """SFT_CONTEXT_ROWS rows of (the video, a context of clip answers, the question, the true
    answer): the judge's prompt with `question` context. Each clip answer is replaced by a
    wrong one with probability P_CORRUPT_CLIP_ANSWER; the target stays the truth."""
    name = truth["name"]
    # Questions whose clip answers are a few words; those about the order of events read three
    # clip descriptions (rows 2-3x as long), so they stay out of the budget's SFT.
    specs = [s for s in text.answerable_specs(truth) if s["type"] not in text.DESCRIBED_IN_CLIPS]
    ranges = world.clip_frame_ranges(truth["num_frames"])
    items = []
    for k in range(SFT_CONTEXT_ROWS):
        spec = specs[int(rng.integers(len(specs)))]
        slots = [text.wrong_clip_answer(truth, spec, frames, rng)
                 if rng.random() < P_CORRUPT_CLIP_ANSWER else text.clip_answer(truth, spec, frames)
                 for frames in ranges]
        question = prompts.question_with_context(
            text.question_text(spec, _pick_paraphrase(rng, spec)),
            prompts.join_clip_descriptions(slots))
        items.append({"id": f"{name}_context{k}", "images": video_path(name),
                      "conversations": _conversation(question, text.true_answer(truth, spec))})
    return items


def _named_clip_context_items(truth: dict, rng: np.random.Generator) -> list[dict]:
    """Context reading for the `named_clip` context: each question of the video whose time
    phrase names a clip (`prompts.clip_named_by`: the colour at the start or at the end), in
    each of its wordings, as (the video, what the named clip shows, the question) -> the true
    answer. The clip answer is replaced by a wrong one with probability P_CORRUPT_CLIP_ANSWER;
    the target stays the truth."""
    name = truth["name"]
    ranges = world.clip_frame_ranges(truth["num_frames"])
    items = []
    for spec in text.answerable_specs(truth):
        for paraphrase in range(len(text.QUESTION_TEMPLATES[spec["type"]])):
            question = text.question_text(spec, paraphrase)
            clip = prompts.clip_named_by(question, len(ranges))
            if clip is None or spec["type"] == "describe":
                continue
            frames = ranges[clip]
            slot = (text.wrong_clip_answer(truth, spec, frames, rng)
                    if rng.random() < P_CORRUPT_CLIP_ANSWER
                    else text.clip_answer(truth, spec, frames))
            context = prompts.join_clip_descriptions([slot], [clip + 1])
            items.append({"id": f"{name}_namedcontext{len(items)}", "images": video_path(name),
                          "conversations": _conversation(
                              prompts.question_with_context(question, context),
                              text.true_answer(truth, spec))})
    return items


def _preference_items(truth: dict, rng: np.random.Generator) -> list[dict]:
    items = []
    for k, spec in enumerate(_pair_specs(truth, rng)):
        pair = _answer_pair(truth, spec, rng)
        if pair is None:
            continue
        question, answer_1, answer_2, better, scores = pair
        # The truth as the feedback stage records it, so `--config.labels=truth` reads it too.
        items.append({"id": f"{truth['name']}_pair{k}", "images": video_path(truth["name"]),
                      "conversations": _conversation(question, ""),
                      "output_1": {"value": answer_1}, "output_2": {"value": answer_2},
                      "preference": better, "true_preference": better,
                      "true_scores": [float(x) for x in scores]})
    return items


def _eval_items(truth: dict, rng: np.random.Generator) -> dict[str, list[dict]]:
    name = truth["name"]
    specs = text.answerable_specs(truth)
    out = {"eval_qa": [], "eval_generic": [], "eval_temporal": [], "eval_consistency": []}
    for k, spec in enumerate(s for s in specs if s["type"] in text.SHORT_TYPES):
        out["eval_qa"].append({"video_name": name, "question_id": f"{name}_q{k}",
                               "question": text.question_text(spec),
                               "answer": text.true_answer(truth, spec)})
    describe = {"type": "describe"}
    paraphrase = int(rng.integers(len(text.QUESTION_TEMPLATES["describe"])))
    out["eval_generic"].append({"video_name": name, "Q": text.question_text(describe, paraphrase),
                                "A": text.describe(truth)})
    temporal = [s for s in specs if s["type"] in text.TEMPORAL_TYPES]
    if temporal:
        spec = temporal[int(rng.integers(len(temporal)))]
        out["eval_temporal"].append({"video_name": name, "Q": text.question_text(spec),
                                     "A": text.true_answer(truth, spec)})
    paraphrasable = [s for s in specs if len(text.QUESTION_TEMPLATES[s["type"]]) > 1]
    spec = paraphrasable[int(rng.integers(len(paraphrasable)))]
    out["eval_consistency"].append({"video_name": name, "Q1": text.question_text(spec, 0),
                                    "Q2": text.question_text(spec, 1),
                                    "A": text.true_answer(truth, spec)})
    return out


def _write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _check_decodable(path: str, size: int) -> None:
    try:  # decord 0.6.0 rejects some small sizes (16, 24, 48, 72 px): say so at once
        decode_video_file(path, 1, allow_fallback=False)
    except Exception as error:
        raise ValueError(f"decord cannot decode {size}px videos ({error}); "
                         "use a size such as 32, 64 or 96") from error


def generate_world(out_dir: str, num_train: int = 512, num_eval: int = 64, frames: int = 8,
                   size: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Generates a world into `out_dir`; returns the manifest ({"files": {key: path}, ...})."""
    if frames < world.NUM_CLIPS or num_train < 1 or num_eval < 1:
        raise ValueError("need frames >= 3 and at least one train and one eval video")
    os.makedirs(os.path.join(out_dir, "videos", "clips"), exist_ok=True)
    rng = np.random.default_rng(seed)
    # Files added later draw from a stream of their own, so that adding one leaves the others
    # (and the videos) as they were.
    named_context_rng = np.random.default_rng([seed, 1])
    names = [f"train_{i:05d}" for i in range(num_train)] + [f"eval_{i:05d}" for i in range(num_eval)]
    num_rl = int(round(num_train * RL_FRACTION)) if num_train > 1 else 0
    rl_names = set(names[num_train - num_rl:num_train])
    truths, descriptions = {}, {}
    outputs: dict[str, list] = {key: [] for key in JSON_FILES}
    for name in tqdm(names, desc="synthetic world", unit="video", disable=not progress):
        truth = world.sample_truth(rng, name, frames, size, FPS)
        truths[name] = truth
        video = render.render_frames(truth)
        render.encode_mp4(video, os.path.join(out_dir, video_path(name)), FPS)
        clip_texts = text.describe_clips(truth)
        for clip, clip_frames in enumerate(world.clip_frame_ranges(frames)):
            render.encode_mp4(video[clip_frames], os.path.join(out_dir, clip_path(name, clip)), FPS)
        context = prompts.join_clip_descriptions(clip_texts)
        descriptions[name] = {"description": text.describe(truth), "clips": clip_texts,
                              "context": context}
        if name.startswith("eval_"):
            for key, items in _eval_items(truth, rng).items():
                outputs[key].extend(items)
        elif name in rl_names:
            short, long = _instruction_items(truth, rng, max_short=4)
            outputs["policy_init"].extend(short + long[:1])
            outputs["ppo_prompts"].extend(
                _ppo_prompt_items(truth, rng, len(outputs["ppo_prompts"])))
            outputs["preferences_oracle"].extend(_preference_items(truth, rng))
        else:
            short, long = _instruction_items(truth, rng, max_short=6)
            outputs["sft_short"].extend(short)
            outputs["sft_long"].extend(long)
            outputs["sft_judge"].extend(_judge_items(truth, context, rng))
            outputs["sft_clip"].extend(_clip_items(truth, rng))
            outputs["sft_context"].extend(_context_items(truth, rng))
            outputs["sft_named_context"].extend(_named_clip_context_items(truth,
                                                                          named_context_rng))
        if name == names[0]:
            _check_decodable(os.path.join(out_dir, video_path(name)), size)

    files = {key: f"{key}.json" for key in JSON_FILES}
    for key in JSON_FILES:
        _write_json(os.path.join(out_dir, files[key]), outputs[key])
    _write_json(os.path.join(out_dir, "truth.json"), truths)
    _write_json(os.path.join(out_dir, "descriptions.json"), descriptions)
    tokenizer.train_tokenizer(_corpus(outputs, descriptions), os.path.join(out_dir, "tokenizer"))
    manifest = {
        "args": {"num_train": num_train, "num_eval": num_eval, "frames": frames, "size": size,
                 "seed": seed, "fps": FPS},
        "files": {**files, "truth": "truth.json", "descriptions": "descriptions.json",
                  "tokenizer": "tokenizer", "videos": "videos"},
        "counts": {key: len(outputs[key]) for key in JSON_FILES},
    }
    _write_json(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


def generate_rl_split(out_dir: str, num_videos: int, frames: int = 8, size: int = 64,
                      seed: int = 1, progress: bool = True) -> dict:
    """More of the world's RL split: newly drawn videos with their PPO prompts (as the world
    draws them: RL_SHORT_QUESTIONS short questions and the description each), truth and oracle
    pairs, in the world's file names (ppo_prompts.json, truth.json, preferences_oracle.json;
    `out_dir` is the video root). The feedback and RM stages read it with
    `--config.world_dir`/`prompts`/`preferences` and the world's tokenizer (the texts come from
    the same templates), to measure what more prompts or pairs buy. Pick a seed other than the
    world's. Returns the item counts."""
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    rng = np.random.default_rng(seed)
    outputs = {"ppo_prompts": [], "preferences_oracle": []}
    truths = {}
    for index in tqdm(range(num_videos), desc="RL split", unit="video", disable=not progress):
        truth = world.sample_truth(rng, f"rl_{index:06d}", frames, size, FPS)
        truths[truth["name"]] = truth
        render.encode_mp4(render.render_frames(truth),
                          os.path.join(out_dir, video_path(truth["name"])), FPS)
        outputs["ppo_prompts"].extend(
            _ppo_prompt_items(truth, rng, len(outputs["ppo_prompts"])))
        outputs["preferences_oracle"].extend(_preference_items(truth, rng))
    for key, items in outputs.items():
        _write_json(os.path.join(out_dir, f"{key}.json"), items)
    _write_json(os.path.join(out_dir, "truth.json"), truths)
    return {key: len(items) for key, items in outputs.items()}


def _corpus(outputs: dict, descriptions: dict):
    """Every text a stage will tokenise: items, descriptions, and all prompt templates."""
    yield prompts.VICUNA_V1_SYSTEM + " USER: ASSISTANT:"
    user, assistant = prompts.rm_evaluation_prompt()
    for _ in range(4):
        yield user
        yield assistant
        for reply in prompts.PAIRWISE_REPLIES:
            yield prompts.judge_prompt("q", "1", "2", "c", reply)
    for described in descriptions.values():
        yield described["context"]
    for items in outputs.values():
        for item in items:
            if "conversations" in item:  # as the model sees them: template, roles and all
                yield conversation.render(item["conversations"])[0]
            for key in ("question", "answer", "Q", "Q1", "Q2", "A"):
                if key in item:
                    yield item[key]
            for key in ("output_1", "output_2"):
                if key in item:
                    yield item[key]["value"]


def load_truth(world_dir: str) -> dict:
    """{video name: truth} of a generated world."""
    with open(os.path.join(world_dir, "truth.json")) as f:
        return json.load(f)


def load_manifest(world_dir: str) -> dict:
    with open(os.path.join(world_dir, "manifest.json")) as f:
        return json.load(f)
