"""Stage 2: context-aware AI feedback. The SFT policy samples, describes and judges
(feedback/judge.py) each (video, question) of the prompt set.

Output: WORKDIR/feedback/preferences.json in the reference's preference format plus the judge's
`confidence` (P of the preferred answer) and, on the synthetic world, the scorer's
`true_preference`. Work is split across processes (each takes its slice of every batch and
writes its own part file, one JSON line per finished prompt), so a rerun after a crash skips
what is done. The no-context ablation (`context='none'`) judges without a description; with
context the run also measures the no-context judge on the same pairs, so the two agreements with
the truth are a paired comparison.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import numpy as np
import transformers
from jax.experimental import multihost_utils
from tqdm import tqdm

from rlaif_jax.data import conversation, prompts
from rlaif_jax.data.build import BUILD_INFO, build
from rlaif_jax.data.builders.items_json import load_items
from rlaif_jax.data.pipeline import Pipeline
from rlaif_jax.engine.metrics import MetricsWriter
from rlaif_jax.engine.pretrained import load_model
from rlaif_jax.feedback.judge import (PER_VIDEO_CONTEXT, AIFeedback, FeedbackSettings,
                                      apply_margin, decide, question_of)
from rlaif_jax.feedback.records import (clip_answer_grades, judged_item, part_path,
                                        preference_item, read_records, summarize, truth_of)
from rlaif_jax.parallel import sharding as su
from rlaif_jax.parallel.mesh import ConfigError, make_mesh
from rlaif_jax.sampling.generate import SamplingConfig
from rlaif_jax.workdir.files import JsonlAppender, atomic_write_json, atomic_write_text
from rlaif_jax.workdir.layout import resolve_init, world_dir, write_config


def run_batches(engine: AIFeedback, pipeline, items_by_id: dict, out_path: str, rng: jax.Array,
                truths: Optional[dict] = None, progress: bool = True,
                stop_after: Optional[int] = None) -> list[dict]:
    """Runs the feedback over this process's rows of every batch of `pipeline` (a prompt
    pipeline with shuffle=False), appending one record per prompt to `out_path`; prompts
    already there are skipped. `stop_after` stops after that many batches (tests: a crash)."""
    settings = engine.settings
    done = read_records(out_path)
    appender = JsonlAppender(out_path)
    done_ids = {r["id"] for r in done}
    contexts = {r["video_id"]: r["context"] for r in done if r.get("context") is not None}
    steps = pipeline.steps_per_epoch
    bar = tqdm(total=steps, desc="feedback", unit="batch", disable=not progress)
    ran = 0
    for step in range(steps):
        bar.update(1)
        batch = pipeline.batch(step)
        valid = np.asarray(batch["valid"])
        records_in = [pipeline.record(i) if ok else None
                      for i, ok in zip(batch["index"], valid)]
        todo = [ok and str(r["id"]) not in done_ids for r, ok in zip(records_in, valid)]
        if not any(todo):
            continue
        if stop_after is not None and ran >= stop_after:
            break
        ran += 1
        # Filler rows copy a real row (static shapes); their outputs are ignored.
        first = int(np.argmax(valid))
        for key in ("input_ids", "attention_mask", "frames", "has_video"):
            batch[key] = np.where(
                valid.reshape((-1,) + (1,) * (batch[key].ndim - 1)), batch[key],
                batch[key][first:first + 1])
        key = jax.random.fold_in(rng, step)
        video_tokens = engine.encode(batch["frames"])
        has_video = batch["has_video"]
        answers = engine.sample_answers(batch["input_ids"], batch["attention_mask"],
                                        video_tokens, has_video, jax.random.fold_in(key, 0))
        turns = [conversation.first_human_turn(_turns(r)) if r else None for r in records_in]
        turns = [t if t is not None else turns[first] for t in turns]
        batch_contexts = None
        if settings.context in PER_VIDEO_CONTEXT:
            video_ids = [int(r["video"]) if r else -1 for r in records_in]
            if any(v not in contexts for v, t in zip(video_ids, todo) if t):
                described = engine.describe(batch["frames"], jax.random.fold_in(key, 1))
                for v, text, ok in zip(video_ids, described, valid):
                    if ok and v not in contexts:
                        contexts[v] = text
            batch_contexts = [contexts.get(v, "") for v in video_ids]
        elif settings.context in ("question", "named_clip"):  # per prompt, from its question
            build = engine.clip_context if settings.context == "question" else (
                engine.named_clip_context)
            batch_contexts = build(batch["frames"],
                                   [prompts.clip_question(question_of(t)) for t in turns],
                                   jax.random.fold_in(key, 1))
        rows = engine.judge_rows(turns, answers, batch_contexts)
        p = engine.judge(rows, video_tokens, has_video)
        p_none = None
        if settings.context != "none" and settings.measure_no_context:
            p_none = engine.judge(engine.judge_rows(turns, answers, None), video_tokens,
                                  has_video)
        finished = []
        for row, record in enumerate(records_in):
            if not todo[row]:
                continue
            item = items_by_id.get(str(record["id"]), {})
            a1, a2 = answers[row]
            out = {"id": str(record["id"]), "video_id": int(record["video"]),
                   "images": item.get("images", item.get("video")),
                   "question_turn": turns[row], "answers": [a1, a2],
                   "context": None if batch_contexts is None else batch_contexts[row],
                   "context_mode": settings.context, "p_output_1": None,
                   "drop_reason": None}
            out.update(truth_of(truths, out["images"], question_of(turns[row]), a1, a2))
            if settings.context in ("question", "named_clip"):
                out.update(clip_answer_grades(truths, out["images"], question_of(turns[row]),
                                              out["context"]))
            if a1 == a2:
                out["drop_reason"] = "identical_answers"
            elif rows[row] is None:
                out["drop_reason"] = "judge_prompt_too_long"
            else:
                p1, preference, confidence, _ = decide(p[row], settings.margin)
                out.update(p_output_1=p1, p_orders=[float(x) for x in p[row]],
                           preference=preference, confidence=confidence)
                if p_none is not None and not np.isnan(p_none[row]).any():
                    out["p_output_1_no_context"] = float(np.mean(p_none[row]))
                elif settings.context == "none":
                    out["p_output_1_no_context"] = p1
            finished.append(out)
        appender.append(finished)
        done_ids.update(r["id"] for r in finished)
    bar.close()
    return read_records(out_path)


def _turns(record: dict) -> list[dict]:
    return [{"from": r, "value": v} for r, v in zip(record["roles"], record["values"])]


# ---------------------------------------------------------------------------------------------
# The stage: config -> WORKDIR/feedback/{preferences.json, metrics.jsonl, parts/}


def resolve_paths(config) -> dict:
    """Where the stage reads and writes; defaults point into the synthetic world of the
    workdir (WORKDIR/data/world, written by the SFT stage)."""
    workdir = os.path.abspath(config.workdir)
    world = world_dir(workdir, config.world_dir)
    paths = {
        "stage": os.path.join(workdir, "feedback"),
        "init": resolve_init(workdir, config.init) or os.path.join(workdir, "sft"),
        "prompts": config.prompts or os.path.join(world, "ppo_prompts.json"),
        "video_root": config.video_root or world,
        "tokenizer": config.tokenizer or os.path.join(world, "tokenizer"),
        "truth": "" if config.truth == "none" else (
            config.truth or os.path.join(world, "truth.json")),
    }
    if not os.path.isfile(paths["prompts"]):
        raise ConfigError(f"prompts file {paths['prompts']} does not exist (set config.prompts, "
                          "or run the SFT stage first to write the synthetic world)")
    if paths["truth"] and not os.path.isfile(paths["truth"]):
        if config.truth:
            raise ConfigError(f"config.truth={config.truth}: no such file")
        paths["truth"] = ""  # not the synthetic world: no truth to compare with
    return paths


def settings_from_config(config) -> FeedbackSettings:
    s, c = config.sampling, config.context_sampling
    return FeedbackSettings(
        answer_sampling=SamplingConfig(max_new_tokens=s.max_new_tokens,
                                       temperature=float(s.temperature), top_k=s.top_k,
                                       top_p=float(s.top_p), prompt_bucket=config.prompt_bucket),
        context_sampling=SamplingConfig(max_new_tokens=c.max_new_tokens,
                                        temperature=float(c.temperature), top_k=c.top_k,
                                        top_p=float(c.top_p), prompt_bucket=config.prompt_bucket),
        answer_samples=config.answer_samples,
        num_clips=config.num_clips, context=config.context, judge_reply=config.judge_reply,
        measure_no_context=config.measure_no_context, margin=float(config.margin),
        max_judge_length=config.max_judge_length, prompt_bucket=config.prompt_bucket)


def _build_prompt_data(paths: dict, out_dir: str, num_frames: int, size: int) -> None:
    """A tfds build of the prompt set (frames decoded once); reused when it matches."""
    info_path = os.path.join(out_dir, BUILD_INFO)
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if (info.get("json", {}).get("train") == paths["prompts"]
                and info.get("num_frames") == num_frames and info.get("size") == size):
            return
    build("prompt", {"train": paths["prompts"]}, paths["video_root"], out_dir, num_frames,
          size, overwrite=True, verbose=False)


def run(config, mesh=None) -> dict:
    """The feedback stage; returns its metrics (process 0) and writes preferences.json.
    Each process runs its slice of every batch on its own devices, so the global `mesh` the
    launcher made is not used: the stage makes a per-process one from `config.mesh`."""
    del mesh
    settings = settings_from_config(config)
    paths = resolve_paths(config)
    primary = jax.process_index() == 0
    # Each process runs its slice of every batch on its own devices.
    mesh = make_mesh(config.mesh.to_dict(), jax.local_devices())
    rules = su.make_rules(config.rules)
    if config.batch_size % (jax.process_count() * su.batch_divisor(mesh)):
        raise ConfigError(f"batch_size={config.batch_size} must be a multiple of processes x "
                          f"batch shards = {jax.process_count()} x {su.batch_divisor(mesh)}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths["tokenizer"])
    model, params = load_model(paths["init"], mesh, rules, tokenizer)
    variables = {"params": params}
    engine = AIFeedback(model, variables, tokenizer, settings, mesh, rules)

    stage_dir = paths["stage"]
    data_dir = os.path.join(stage_dir, "data")
    vision = engine.vision
    num_frames = model.config.num_frames if vision else 1
    size = model.config.vision.image_size if vision else 32
    if primary:
        os.makedirs(os.path.join(stage_dir, "parts"), exist_ok=True)
        write_config(stage_dir, config)
        _build_prompt_data(paths, data_dir, num_frames, size)
    multihost_utils.sync_global_devices("feedback: prompt data built")
    pipeline = Pipeline(data_dir, "train", tokenizer, config.batch_size,
                        config.max_prompt_length, config.seed, shuffle=False,
                        num_frames=num_frames)
    items = load_items(paths["prompts"])
    items_by_id = {str(item.get("id", item.get("uid", position))): item
                   for position, item in enumerate(items) if isinstance(item, dict)}
    truths = None
    if paths["truth"]:
        with open(paths["truth"]) as f:
            truths = json.load(f)
    part = part_path(os.path.join(stage_dir, "parts"), jax.process_index(), jax.process_count())
    run_batches(engine, pipeline, items_by_id, part, jax.random.PRNGKey(config.seed), truths,
                progress=primary and config.log.progress)
    multihost_utils.sync_global_devices("feedback: all parts written")
    if not primary:
        return {}

    records = []
    for index in range(jax.process_count()):
        records += read_records(part_path(os.path.join(stage_dir, "parts"), index,
                                          jax.process_count()))
    records = apply_margin(records, settings.margin)
    kept = [preference_item(r) for r in records if r["kept"]]
    atomic_write_json(os.path.join(stage_dir, "preferences.json"), kept)
    atomic_write_text(os.path.join(stage_dir, "judged.jsonl"), "".join(
        json.dumps(judged_item(r), ensure_ascii=False) + "\n"
        for r in records if r.get("p_output_1") is not None))
    metrics = summarize(records, settings.margin)
    for reason, count in pipeline.skipped.items():
        metrics[f"feedback/skipped_{reason}"] = count
    with open(os.path.join(data_dir, BUILD_INFO)) as f:
        build_info = json.load(f)
    for reason, count in build_info.get("skipped_total", {}).items():
        metrics[f"feedback/skipped_{reason}"] = count
    writer = MetricsWriter(stage_dir, "feedback", tensorboard=config.log.tensorboard)
    writer.write(len(records), metrics)
    writer.close()
    print(f"[feedback] {len(kept)} preference pairs of {len(records)} prompts -> "
          f"{os.path.join(stage_dir, 'preferences.json')}", flush=True)
    for key in ("feedback/agreement_with_truth", "feedback/agreement_with_truth_no_context",
                "feedback/agreement_with_truth_time_localised",
                "feedback/agreement_with_truth_no_context_time_localised",
                "feedback/agreement_with_truth_decisive",
                "feedback/agreement_with_truth_no_context_decisive",
                "feedback/kept_fraction", "feedback/mean_confidence"):
        if key in metrics:
            print(f"[feedback] {key} = {metrics[key]:.4f}", flush=True)
    return metrics
