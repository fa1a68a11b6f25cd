"""The `eval` stage: answer the evaluation sets with a model, judge the answers, write the scores.

    python launch/main.py --config=configs/eval.py --config.init=PATH

For each task (configs/eval.py `tasks`, or a synthetic world's eval files) it

1. answers every question with the model (batched KV-cache sampling, docs/method.md's inference
   settings), appending each finished batch to `OUT/<task>/answers.jsonl`;
2. writes `OUT/<task>/predictions.json` in the reference's format;
3. asks the judge about every prediction on the task's axes, appending each judgement to
   `OUT/<task>/judgements.jsonl` as it arrives;
4. writes `OUT/results.json` and `OUT/results.md` and prints the table.

Resumable: a rerun reads the JSONL files and asks neither the model nor the judge again for
what is already there (the model is not even loaded when every answer exists). Judgements of
another judge are not reused; transport failures (endpoint down after every retry) are not
saved, so a rerun asks again. `OUT/run.json` records the settings the answers depend on, and a
rerun with other settings stops at start instead of mixing the two.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from typing import Any, Optional

import ml_collections
import tqdm

from rlaif_jax.data import video as video_io
from rlaif_jax.eval import results as results_lib
from rlaif_jax.eval import tasks as tasks_lib
from rlaif_jax.eval.http_judge import HttpJudge
from rlaif_jax.eval.model_judge import ModelJudge
from rlaif_jax.eval.synthetic_judge import SyntheticJudge
from rlaif_jax.inference.stage import QuestionAnswerer
from rlaif_jax.workdir.files import JsonlAppender, atomic_write_json, read_jsonl

JUDGE_KINDS = ("synthetic", "http", "model", "none")
DEFAULT_WORLD = os.path.join("data", "world")  # under the workdir, when config.world is empty


# ---------------------------------------------------------------------------------------------
# Config: everything checked before anything is loaded


def _world_dir(config) -> str:
    if config.world:
        return config.world
    candidate = os.path.join(config.workdir, DEFAULT_WORLD)
    return candidate if os.path.isdir(candidate) else ""


def resolve_tasks(config) -> dict[str, str]:
    """{task: JSON path}: the configured files, else the synthetic world's eval files."""
    given = {task: path for task, path in config.tasks.items() if path}
    unknown = sorted(set(config.tasks.keys()) - set(tasks_lib.TASKS))
    if unknown:
        raise ValueError(f"unknown config.tasks keys {unknown}; known: {list(tasks_lib.TASKS)}")
    if not given:
        world = _world_dir(config)
        if not world:
            raise ValueError("nothing to evaluate: set config.tasks.<task>=FILE (tasks: "
                             f"{list(tasks_lib.TASKS)}) or config.world=a synthetic world")
        given = {task: os.path.join(world, name) for task, name in tasks_lib.WORLD_FILES.items()}
    for task, path in given.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config.tasks.{task}: {path} is not a file")
    return given


def resolved_config(config) -> ml_collections.ConfigDict:
    """A copy with the defaults that depend on other fields filled in (checked at start)."""
    c = ml_collections.ConfigDict(config.to_dict())
    if c.judge.kind not in JUDGE_KINDS:
        raise ValueError(f"config.judge.kind={c.judge.kind!r}: expected one of {list(JUDGE_KINDS)}")
    world = _world_dir(c)
    if not c.video_root and world:
        c.video_root = os.path.join(world, "videos")
    if c.judge.kind == "synthetic" and not c.judge.world:
        if not world:
            raise ValueError("config.judge.kind='synthetic' needs a synthetic world: set "
                             "config.world (or config.judge.world)")
        c.judge.world = world
    if c.num_frames == 0:  # the world's own frame count
        manifest = os.path.join(world, "manifest.json") if world else ""
        if not manifest or not os.path.isfile(manifest):
            raise ValueError("config.num_frames=0 means the synthetic world's frame count, but "
                             "no world is set: give config.num_frames or config.world")
        with open(manifest) as f:
            c.num_frames = int(json.load(f)["args"]["frames"])
    if c.num_frames < 1:
        raise ValueError(f"config.num_frames={c.num_frames}: must be >= 1 (0: the world's)")
    if not c.output_dir:
        c.output_dir = os.path.join(c.workdir, "eval", c.name or _default_name(c.init))
    if c.max_items < 0:
        raise ValueError(f"config.max_items={c.max_items}: must be >= 0 (0: all)")
    return c


def _default_name(init: str) -> str:
    return os.path.basename(os.path.normpath(init)) if init else "model"


def _fingerprint(c) -> dict:
    """The settings answers depend on: a rerun must match them to reuse saved answers."""
    return {"init": os.path.abspath(c.init) if c.init else "", "blind": bool(c.blind),
            "template": c.template, "num_frames": c.num_frames,
            "sampling": c.sampling.to_dict(), "seed": c.seed}


def _check_fingerprint(c) -> None:
    path = os.path.join(c.output_dir, "run.json")
    current = _fingerprint(c)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != current:
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(f"{c.output_dir} holds answers made with other settings ({changed}); "
                             "use another config.output_dir or remove it")
    else:
        atomic_write_json(path, current)


# ---------------------------------------------------------------------------------------------
# Judges


def build_judge(c) -> Optional[Any]:
    j = c.judge
    if j.kind == "none":
        return None
    if j.kind == "synthetic":
        return SyntheticJudge(j.world)
    if j.kind == "http":
        return HttpJudge(base_url=j.base_url, model=j.model, api_key_env=j.api_key_env,
                         concurrency=j.concurrency, timeout_s=j.timeout_s,
                         max_retries=j.max_retries, backoff_s=j.backoff_s,
                         max_backoff_s=j.max_backoff_s, parse_retries=j.parse_retries,
                         temperature=j.temperature, max_tokens=j.max_tokens, seed=c.seed)
    return ModelJudge.from_config(c)


# ---------------------------------------------------------------------------------------------
# The run


def _load_answers(path: str) -> dict:
    records, bad = read_jsonl(path)
    if bad:
        logging.warning("eval: %s: %d torn or unreadable lines ignored", path, bad)
    return {r["key"]: r for r in records if "key" in r}


def _load_judgements(path: str, judge_name: str) -> dict:
    records, bad = read_jsonl(path)
    if bad:
        logging.warning("eval: %s: %d torn or unreadable lines ignored", path, bad)
    done = {}
    for r in records:
        if r.get("judge") == judge_name and r.get("final", True) and "item_id" in r:
            done[f"{r['item_id']}|{r['axis']}"] = r
    return done


def _video_source(c, video_name: str) -> Optional[str]:
    if c.blind:
        return None
    return os.path.abspath(video_io.find_video_by_name(c.video_root, video_name))


def _answer_all(c, plan, answerer) -> Any:
    """Asks the model every question that has no saved answer; returns the answerer used."""
    requests, appenders = [], {}
    for task, (items, answers, path) in plan.items():
        appenders[task] = JsonlAppender(path)
        for item in items:
            for key, question in zip(item.question_keys(), item.questions):
                if key not in answers:
                    requests.append({"id": f"{task}/{key}", "question": question,
                                     "video": _video_source(c, item.video_name)})
    if not requests:
        return answerer
    logging.info("eval: %d questions to answer", len(requests))
    if answerer is None:
        answerer = QuestionAnswerer(c)
    if not c.blind and not getattr(answerer, "has_vision", True):
        raise ValueError(f"config.init={c.init} is a text-only model: set config.blind=True to "
                         "evaluate it on the questions alone")

    def save(records):
        by_task = collections.defaultdict(list)
        for record in records:
            task, key = record["id"].split("/", 1)
            saved = {"key": key, "answer": record["answer"]}
            if record.get("error"):
                saved["error"] = record["error"]
            by_task[task].append(saved)
            plan[task][1][key] = saved
        for task, saved in by_task.items():
            appenders[task].append(saved)

    answerer.answer(requests, on_done=save, desc="eval answers")
    return answerer


def _judge_all(c, judge, task_judgements) -> collections.Counter:
    """Asks the judge what is not yet judged; returns the transport failures (not saved)."""
    pending, appenders = [], {}
    for task, (tasks, done, path) in task_judgements.items():
        appenders[task] = JsonlAppender(path)
        pending += [(task, t) for t in tasks if t.key not in done]
    unsaved: collections.Counter = collections.Counter()
    if not pending:
        return unsaved
    owner = {}
    for task, t in pending:
        owner[t.key] = task
    logging.info("eval: %d judgements to ask %s for", len(pending), judge.name)
    with tqdm.tqdm(total=len(pending), desc=f"eval judge ({judge.name})", unit="item") as bar:
        for judgement in judge.judge([t for _, t in pending]):
            task = owner[judgement.key]
            if judgement.final:
                record = judgement.as_record(judge.name)
                appenders[task].append([record])
                task_judgements[task][1][judgement.key] = record
            else:
                unsaved[f"{task}:{judgement.error}"] += 1
            bar.update(1)
    return unsaved


def run_eval(config, answerer: Optional[Any] = None, judge: Optional[Any] = None) -> dict:
    """Runs the evaluation of configs/eval.py; returns the results (also written to disk).

    `answerer` (an object with `answer(items, on_done, desc)` and `has_vision`, as
    `inference.stage.QuestionAnswerer`) and `judge` replace the ones the config would build.
    """
    c = resolved_config(config)
    task_paths = resolve_tasks(c)
    if judge is None:
        judge = build_judge(c)
    os.makedirs(c.output_dir, exist_ok=True)
    _check_fingerprint(c)

    plan, skipped = {}, {}
    for task, path in task_paths.items():
        items, skipped[task] = tasks_lib.load_items(task, path)
        if c.max_items:
            items = items[:c.max_items]
        answers_path = os.path.join(c.output_dir, task, "answers.jsonl")
        plan[task] = (items, _load_answers(answers_path), answers_path)
    _answer_all(c, plan, answerer)

    task_judgements = {}
    for task, (items, answers, _) in plan.items():
        predictions, judge_tasks = [], []
        for item in items:
            item_answers = [answers.get(k, {}).get("answer") for k in item.question_keys()]
            predictions.append(tasks_lib.prediction_record(task, item, item_answers))
            judge_tasks += tasks_lib.judge_tasks(task, item, item_answers)
        atomic_write_json(os.path.join(c.output_dir, task, "predictions.json"), predictions)
        path = os.path.join(c.output_dir, task, "judgements.jsonl")
        done = _load_judgements(path, judge.name) if judge is not None else {}
        task_judgements[task] = (judge_tasks, done, path)
    unsaved = _judge_all(c, judge, task_judgements) if judge is not None else collections.Counter()

    results = results_lib.summarise(
        name=c.name or _default_name(c.init), judge=judge.name if judge is not None else None,
        plan=plan, judgements={t: v[1] for t, v in task_judgements.items()},
        judge_tasks={t: v[0] for t, v in task_judgements.items()}, skipped=skipped,
        unsaved=unsaved)
    results["output_dir"] = c.output_dir
    results_lib.write(results, c.output_dir)
    print(results_lib.markdown_table([results]))
    if unsaved:
        logging.warning("eval: %d judgements failed in transport and were not saved (%s); "
                        "rerun the same command to ask again", sum(unsaved.values()), dict(unsaved))
    return results


def run(config, mesh=None) -> dict:
    """The `eval` stage of launch/main.py: the answerer makes its own mesh from config.mesh."""
    del mesh
    return run_eval(config)
