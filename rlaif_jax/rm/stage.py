"""Stage 3, the reward model: a Bradley-Terry head on the SFT video LLM, trained on the feedback
stage's preference pairs (rm/data.py) with the engine's loop; held-out accuracy against the AI
labels and, where the pairs carry it, the truth. The model and its loss are in rm/model.py.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import jax
import numpy as np
import transformers
from jax.experimental import multihost_utils

from rlaif_jax.data.pipeline import Pipeline
from rlaif_jax.engine import optim
from rlaif_jax.engine.loop import Stage, train
from rlaif_jax.engine.metrics import MetricsWriter
from rlaif_jax.engine.model_init import model_from_config, starting_variables
from rlaif_jax.engine.pretrained import build_stage_model, stage_config
from rlaif_jax.engine.state import init_state, plan_state, state_from_variables
from rlaif_jax.engine.step import make_eval_fn, make_train_step
from rlaif_jax.models.video_llm import is_video_model
from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.parallel.sharding import global_batch, make_rules
from rlaif_jax.rm.data import LABELS, prepare_data, resolve_paths
from rlaif_jax.rm.model import make_rm_loss, pair_rewards


def heldout_verdicts(score_batch, pipeline):
    """(record, said, |r2 - r1|) for each real pair of `pipeline`, in order: said is 1 or 2 (the
    higher reward) or 0.5 for a tie. `score_batch(local batch)` returns the whole global batch's
    rewards [B, 2]."""
    for step in range(pipeline.steps_per_epoch):
        rewards = np.asarray(score_batch(pipeline.batch(step)))
        for index, (r1, r2) in zip(pipeline.global_indices(step), rewards):
            if index >= 0:
                said = 0.5 if r1 == r2 else float((r2 > r1) + 1)
                yield pipeline.record(int(index)), said, abs(r2 - r1)


def rm_eval(eval_fn, pipeline, table: dict, mesh) -> dict:
    """Pairwise accuracy on the held-out split against the AI labels (the judge with context)
    and the truth (a tie of the two rewards counts one half), beside two heuristic baselines
    against the truth: always the longer answer, always answer 1."""
    def score_batch(local):
        return multihost_utils.process_allgather(eval_fn(global_batch(local, mesh)), tiled=True)

    hits, baselines = collections.defaultdict(list), collections.defaultdict(list)
    for record, said, margin in heldout_verdicts(score_batch, pipeline):
        labels = table[record["id"]]
        for name in ("ai", "truth"):
            if labels[name] is not None:
                hit = 0.5 if said == 0.5 else float(said == labels[name])
                hits[name].append(hit)
                if name == "truth" and labels["decisive"]:
                    hits["truth_decisive"].append(hit)
        hits["margin"].append(margin)
        if labels["truth"] is not None:  # heuristic baselines on the same pairs
            longer = labels.get("longer")
            baselines["longer"].append(0.5 if longer is None else float(longer == labels["truth"]))
            baselines["first"].append(float(labels["truth"] == 1))
    out = {f"eval/rm_accuracy_{k}": float(np.mean(v)) for k, v in hits.items() if k != "margin"}
    out.update({f"eval/baseline_{k}_accuracy_truth": float(np.mean(v))
                for k, v in baselines.items()})
    out["eval/heldout_pairs"] = float(len(hits["margin"]))
    out["eval/mean_abs_margin"] = float(np.mean(hits["margin"])) if hits["margin"] else 0.0
    return out


def build_rm_stage(config, mesh):
    """The reward-model stage for engine/loop.py's run_stage."""
    rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % (rows_split * config.accum_steps) or config.eval.batch_size % rows_split:
        raise ConfigError(f"batch_size={config.batch_size} must be a multiple of data*fsdp*"
                          f"accum_steps and eval.batch_size={config.eval.batch_size} of data*fsdp "
                          f"(data*fsdp = {rows_split}, accum_steps = {config.accum_steps})")
    paths = resolve_paths(config)
    name = LABELS.get(config.labels, "rm")
    stage_dir = os.path.join(os.path.abspath(config.workdir), name)
    lora = config.lora.to_dict() if config.lora.rank > 0 else None
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths["tokenizer"])
    heads = dict(reward_head=True, **({"lora": lora} if lora is not None else {}))
    if config.init_model_from_checkpoint:
        step_dir, base_config = stage_config(paths["init"])
        kind = base_config.get("model_kind", "llama")
        model, init_variables = build_stage_model(base_config, tokenizer, **heads)
    else:  # the architecture of config.model (e.g. an HF init is not wired here)
        step_dir, kind = None, config.model_kind
        model, init_variables = model_from_config(kind, config.model, tokenizer, **heads)
    if not is_video_model(model):
        raise ConfigError("the reward model needs a video LLM")
    num_frames, size = model.config.num_frames, model.config.vision.image_size
    data_dir = os.path.join(stage_dir, "data")
    if jax.process_index() == 0:
        prepare_data(config, paths, data_dir, num_frames, size)
    multihost_utils.sync_global_devices("rm: data prepared")
    with open(os.path.join(data_dir, "prepared.json")) as f:
        prepared = json.load(f)
    train = Pipeline(os.path.join(data_dir, "build"), "train", tokenizer, config.batch_size,
                     config.max_length, config.seed, shuffle=True, num_frames=num_frames)
    heldout = Pipeline(os.path.join(data_dir, "build"), "heldout", tokenizer,
                       config.eval.batch_size, config.max_length, config.seed, shuffle=False,
                       num_frames=num_frames)
    num_steps = config.num_steps if config.num_steps > 0 else max(
        1, int(round(config.epochs * train.num_examples / config.batch_size)))

    rules = make_rules(config.rules)
    tx, schedule = optim.make_optimizer(config.optim, num_steps)
    layout = plan_state(init_variables, tx, mesh, rules, config.trainable, config.frozen,
                        config.max_replicated_share)
    weight = float(config.likelihood_weight)
    step = make_train_step(make_rm_loss(model, config.center_coef, weight), layout, schedule,
                           config.accum_steps)
    eval_fn = make_eval_fn(lambda v, b: pair_rewards(model, v, b, weight), layout)

    def fresh_state():
        rng = jax.random.PRNGKey(config.seed)
        if step_dir is None and not config.init:
            return init_state(layout, init_variables, rng)
        variables = starting_variables(step_dir or paths["init"], layout, init_variables,
                                       config.seed)
        return state_from_variables(layout, variables, rng)

    def evaluate(state, frozen):
        return rm_eval(lambda batch: eval_fn(state.params, frozen, batch), heldout,
                       prepared["labels_table"], mesh)

    counts = {f"data/skipped_{k}": v for k, v in prepared["skipped"].items()}
    counts.update({f"data/skipped_{k}": v for k, v in prepared["build_skipped"].items()})
    counts.update({f"data/skipped_{k}": v for k, v in train.skipped.items()})
    counts.update({"data/train_pairs": train.num_examples,
                   "data/heldout_pairs": heldout.num_examples, "data/num_steps": num_steps})
    if jax.process_index() == 0:
        print(f"[{name}] {train.num_examples} training pairs, {heldout.num_examples} held out, "
              f"labels={config.labels}, {num_steps} steps; skipped: "
              f"{ {k: v for k, v in counts.items() if 'skipped' in k} }", flush=True)
    if jax.process_index() == 0:
        writer = MetricsWriter(stage_dir, name, tensorboard=False)
        writer.write(0, counts)
        writer.close()
    # The meta names the architecture actually trained (reward head, adapter), so that a later
    # stage rebuilds this RM from its checkpoint alone.
    resolved = dict(config.to_dict(), model_kind=kind, model=dataclasses.asdict(model.config))
    meta = {"init": step_dir or (os.path.abspath(config.init) if config.init else ""),
            "seed": config.seed, "config": resolved, "data_counts": counts}
    stage = Stage(name=name, layout=layout, train_step=step, data=train,
                  num_steps=num_steps, fresh_state=fresh_state, evaluate=evaluate,
                  meta=json.loads(json.dumps(meta, default=str)))
    return stage, stage_dir, counts


def run(config, mesh) -> dict:
    """The RM stage into WORKDIR/rm, rm_no_context or rm_oracle (rm/data.py LABELS)."""
    stage, directory, _ = build_rm_stage(config, mesh)
    return train(stage, directory, config)
