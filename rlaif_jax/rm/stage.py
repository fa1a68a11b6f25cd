"""Stage 3: the reward model, trained on preference pairs (Bradley-Terry).

The RM is the video LLM with a scalar `reward_head` read at the last real token of
(conversation with one response + the evaluation prompt of `prompts.rm_evaluation_prompt`: the
user asks the assistant to rate its last response, whose turn ends "...the quality score of my
last response is"). `conversation.tokenize_for_reward_model` writes those rows for training,
and `reward_model_rows` writes them the same way for PPO, so PPO scores exactly as the RM was
trained.

Loss (the reference's): BCE-with-logits on r(output_2) - r(output_1) with target 1 when output_2
is preferred (= Bradley-Terry), plus 1e-3 * |mean(r1 + r2)|, which keeps the rewards centred.
The BCE is summed over pairs and weighted by their count (engine/step.py); the centring term is
a batch mean, so the step adds it as `pairs * |mean|` of its batch: exact without accumulation,
a weighted mean of the micro-batches' terms with it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax.data import conversation

CENTER_COEF = 1e-3


def has_vision(model: Any) -> bool:
    return hasattr(model, "encode_video")


def pair_rewards(model: Any, variables: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Rewards [B, 2] of a preference batch: `input_ids`, `attention_mask` [B, 2, L] (padded on
    either side), `frames` [B, T, S, S, 3] and `has_video` [B]. Each video is encoded once and
    shared by its two candidates."""
    ids = batch["input_ids"]
    pairs, candidates, length = ids.shape
    flat = {"input_ids": ids.reshape(pairs * candidates, length),
            "attention_mask": batch["attention_mask"].reshape(pairs * candidates, length)}
    video_tokens = has_video = None
    if batch.get("frames") is not None:
        video_tokens = model.apply(variables, batch["frames"], method="encode_video")
        video_tokens = jnp.repeat(video_tokens, candidates, axis=0)
        has_video = batch.get("has_video")
        has_video = (jnp.ones((pairs,), bool) if has_video is None else has_video.astype(bool))
        has_video = jnp.repeat(has_video, candidates, axis=0)
    flat["video_tokens"], flat["has_video"] = video_tokens, has_video
    return reward_scores(model, variables, flat).reshape(pairs, candidates)


def reward_scores(model: Any, variables: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Scores [B] of reward-model rows (`reward_model_rows`, or the pipeline's candidates):
    `input_ids`, `attention_mask` [B, L] (left or right padded: the head reads each row's last
    real token), and for videos `has_video` [B] with `frames` or precomputed `video_tokens`."""
    out = model.apply(variables, batch["input_ids"], batch["attention_mask"],
                      frames=batch.get("frames"), has_video=batch.get("has_video"),
                      video_tokens=batch.get("video_tokens"), compute_logits=False)
    if out.reward is None:
        raise ValueError("the model has no reward head (set reward_head=True in its config)")
    return out.reward


def preference_loss_sums(rewards: jax.Array, preference: jax.Array,
                         weights: jax.Array | None = None,
                         center_coef: float = CENTER_COEF) -> tuple[jax.Array, dict]:
    """(loss summed over pairs, sums) for engine/step.py. rewards [B, 2] (output_1, output_2),
    preference [B] in {1, 2}; pairs with weight 0 (filler rows, a label outside {1, 2}) count
    nowhere. Sums: loss, bt_loss, center, accuracy (a tie counts one half), weight (pairs)."""
    rewards = rewards.astype(jnp.float32)
    valid = (preference == 1) | (preference == 2)
    w = valid.astype(jnp.float32) if weights is None else valid * weights.astype(jnp.float32)
    target = (preference == 2).astype(jnp.float32)
    margin = rewards[:, 1] - rewards[:, 0]
    # BCE with logits, stable: softplus(m) - y * m.
    bce = jax.nn.softplus(margin) - target * margin
    pairs = jnp.sum(w)
    mean_sum = jnp.sum(w * (rewards[:, 0] + rewards[:, 1])) / jnp.maximum(pairs, 1.0)
    center = pairs * jnp.abs(mean_sum)
    bt = jnp.sum(w * bce)
    hits = jnp.where(margin == 0, 0.5, ((margin > 0) == (target > 0)).astype(jnp.float32))
    sums = {"loss": bt + center_coef * center, "bt_loss": bt, "center": center,
            "accuracy": jnp.sum(w * hits), "reward_mean": jnp.sum(w[:, None] * rewards) / 2,
            "weight": pairs}
    return sums["loss"], sums


def make_rm_loss(model: Any, center_coef: float = CENTER_COEF):
    """loss_fn(variables, batch, rng) -> (loss_sum, sums) for engine/step.py."""

    def loss_fn(variables, batch, rng):
        del rng  # no dropout in these models
        rewards = pair_rewards(model, variables, batch)
        return preference_loss_sums(rewards, batch["preference"], batch.get("valid"),
                                    center_coef)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Rows for scoring outside training (PPO): the same tokenisation as the RM's training data.


def reward_model_rows(question_turns: Sequence[dict], responses: Sequence[str], tokenizer,
                      max_length: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded RM rows [B, L] of (question turn, response text) pairs: the question, the
    response (with its closing eos) and the evaluation prompt, exactly as the RM was trained
    (`conversation.tokenize_for_reward_model`; an over-long response is cut, never the prompt).
    L = pad_to or max_length."""
    rows = [conversation.tokenize_for_reward_model(q, r, tokenizer, max_length)
            for q, r in zip(question_turns, responses)]
    length = pad_to or max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------
# The stage: preference JSON -> checked splits -> tfds build -> RM training with held-out eval.

import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

from rlaif_jax.parallel.mesh import ConfigError  # noqa: E402

LABELS = ("ai", "truth")


def check_preference_item(item: Any) -> str | None:
    """None for a usable pair, else why it is skipped (counted in the stage's metrics)."""
    if not isinstance(item, dict):
        return "malformed"
    for key in ("output_1", "output_2"):
        output = item.get(key)
        if not isinstance(output, dict) or not isinstance(output.get("value"), str):
            return "missing_output"
    if item.get("preference") not in (1, 2) or isinstance(item.get("preference"), bool):
        return "invalid_preference"
    return None


def _video_key(item: dict) -> str:
    images = item.get("images", item.get("video", ""))
    return json.dumps(images, sort_keys=True)


def split_preferences(items: Sequence[Any], labels: str, heldout_fraction: float,
                      heldout_max: int, seed: int) -> tuple[list, list, dict, dict]:
    """(train items, held-out items, {id: {'ai', 'truth', 'decisive'}}, skip counts).

    Items are checked (missing output, invalid preference: skipped and counted), given an id if
    they have none, labelled with the AI's or the true preference (labels='truth': the oracle
    control; items without a truth are skipped), and split by video so that no held-out video
    was seen in training."""
    skipped: collections.Counter = collections.Counter()
    usable, table = [], {}
    for position, item in enumerate(items):
        reason = check_preference_item(item)
        if reason is None and labels == "truth" and item.get("true_preference") not in (1, 2):
            reason = "no_truth"
        if reason:
            skipped[reason] += 1
            continue
        item = dict(item, id=str(item.get("id", position)))
        if item["id"] in table:
            skipped["duplicate_id"] += 1
            continue
        truth = item.get("true_preference")
        scores = item.get("true_scores")
        table[item["id"]] = {"ai": int(item["preference"]),
                             "truth": int(truth) if truth in (1, 2) else None,
                             "decisive": bool(scores and scores[0] != scores[1])}
        if labels == "truth":
            item["preference"] = int(truth)
        usable.append(item)
    videos = sorted({_video_key(item) for item in usable})
    order = np.random.default_rng(seed).permutation(len(videos))
    wanted = min(int(round(heldout_fraction * len(usable))), heldout_max)
    heldout_videos, count = set(), 0
    counts = collections.Counter(_video_key(item) for item in usable)
    for index in order:
        if count >= wanted:
            break
        heldout_videos.add(videos[index])
        count += counts[videos[index]]
    train = [item for item in usable if _video_key(item) not in heldout_videos]
    heldout = [item for item in usable if _video_key(item) in heldout_videos]
    return train, heldout, table, dict(skipped)


def prepare_data(config, paths: dict, out_dir: str, num_frames: int, size: int) -> dict:
    """Writes the splits and their tfds build under `out_dir`; returns the preparation info
    (reused when the source, labels and frame settings are unchanged)."""
    from rlaif_jax.data.build import build
    from rlaif_jax.data.builders.items_json import load_items

    info_path = os.path.join(out_dir, "prepared.json")
    key = {"preferences": paths["preferences"], "labels": config.labels,
           "mtime": os.path.getmtime(paths["preferences"]), "frames": num_frames, "size": size,
           "heldout_fraction": config.eval.heldout_fraction,
           "heldout_max": config.eval.heldout_max, "seed": config.seed}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info.get("key") == key:
            return info
    os.makedirs(out_dir, exist_ok=True)
    train, heldout, table, skipped = split_preferences(
        load_items(paths["preferences"]), config.labels, config.eval.heldout_fraction,
        config.eval.heldout_max, config.seed)
    if not train or not heldout:
        raise ConfigError(f"{paths['preferences']}: {len(train)} training and {len(heldout)} "
                          f"held-out pairs after checks (skipped: {skipped}); need both")
    files = {}
    for split, split_items in (("train", train), ("heldout", heldout)):
        files[split] = os.path.join(out_dir, f"{split}.json")
        with open(files[split], "w") as f:
            json.dump(split_items, f)
    built = build("preference", files, paths["video_root"], os.path.join(out_dir, "build"),
                  num_frames, size, overwrite=True, verbose=False)
    info = {"key": key, "labels_table": table, "skipped": skipped,
            "build_skipped": built["skipped_total"], "splits": built["splits"]}
    with open(info_path, "w") as f:
        json.dump(info, f)
    return info


def resolve_paths(config) -> dict:
    workdir = os.path.abspath(config.workdir)
    world = config.world_dir or os.path.join(workdir, "data", "world")
    init = config.init
    if init.startswith("stage:"):
        init = os.path.join(workdir, init[len("stage:"):])
    paths = {"init": init or os.path.join(workdir, "sft"),
             "preferences": config.preferences or os.path.join(workdir, "feedback",
                                                               "preferences.json"),
             "video_root": config.video_root or world,
             "tokenizer": config.tokenizer or os.path.join(world, "tokenizer")}
    if config.labels not in LABELS:
        raise ConfigError(f"labels={config.labels!r}: expected one of {LABELS}")
    if not os.path.isfile(paths["preferences"]):
        raise ConfigError(f"preference file {paths['preferences']} does not exist (run the "
                          "feedback stage first, or set config.preferences)")
    return paths


class _ProcessRows:
    """The loop's data interface over a Pipeline (which already knows its process slice)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def batch(self, step, process_index, process_count):
        del process_index, process_count
        return self.pipeline.batch(step)


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
    """Pairwise accuracy on the held-out split against the AI labels and the truth (a tie of
    the two rewards counts one half)."""
    from jax.experimental import multihost_utils

    from rlaif_jax.engine.loop import global_batch

    def score_batch(local):
        return multihost_utils.process_allgather(eval_fn(global_batch(local, mesh)), tiled=True)

    hits = collections.defaultdict(list)
    for record, said, margin in heldout_verdicts(score_batch, pipeline):
        labels = table[record["id"]]
        for name in ("ai", "truth"):
            if labels[name] is not None:
                hit = 0.5 if said == 0.5 else float(said == labels[name])
                hits[name].append(hit)
                if name == "truth" and labels["decisive"]:
                    hits["truth_decisive"].append(hit)
        hits["margin"].append(margin)
    out = {f"eval/rm_accuracy_{k}": float(np.mean(v)) for k, v in hits.items() if k != "margin"}
    out["eval/heldout_pairs"] = float(len(hits["margin"]))
    out["eval/mean_abs_margin"] = float(np.mean(hits["margin"])) if hits["margin"] else 0.0
    return out


def build_rm_stage(config, mesh):
    """The reward-model stage for engine/loop.py's run_stage."""
    import transformers
    from jax.experimental import multihost_utils

    from rlaif_jax.engine.pretrained import build_stage_model, stage_config
    from rlaif_jax.data.pipeline import Pipeline
    from rlaif_jax.parallel.sharding import make_rules
    from rlaif_jax.engine import optim
    from rlaif_jax.engine.loop import Stage
    from rlaif_jax.engine.model_init import model_from_config, starting_variables
    from rlaif_jax.engine.state import init_state, plan_state, state_from_variables
    from rlaif_jax.engine.step import make_eval_fn, make_train_step

    rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % (rows_split * config.accum_steps) or config.eval.batch_size % rows_split:
        raise ConfigError(f"batch_size={config.batch_size} must be a multiple of data*fsdp*"
                          f"accum_steps and eval.batch_size={config.eval.batch_size} of data*fsdp "
                          f"(data*fsdp = {rows_split}, accum_steps = {config.accum_steps})")
    paths = resolve_paths(config)
    name = "rm" if config.labels == "ai" else "rm_oracle"
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
    if not has_vision(model):
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
    step = make_train_step(make_rm_loss(model, config.center_coef), layout, schedule,
                           config.accum_steps)
    eval_fn = make_eval_fn(lambda v, b: pair_rewards(model, v, b), layout)

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
        from rlaif_jax.engine.metrics import MetricsWriter
        writer = MetricsWriter(stage_dir, name, tensorboard=False)
        writer.write(0, counts)
        writer.close()
    # The meta names the architecture actually trained (reward head, adapter), so that a later
    # stage rebuilds this RM from its checkpoint alone.
    import dataclasses
    resolved = dict(config.to_dict(), model_kind=kind, model=dataclasses.asdict(model.config))
    meta = {"init": step_dir or (os.path.abspath(config.init) if config.init else ""),
            "seed": config.seed, "config": resolved, "data_counts": counts}
    stage = Stage(name=name, layout=layout, train_step=step, data=_ProcessRows(train),
                  num_steps=num_steps, fresh_state=fresh_state, evaluate=evaluate,
                  meta=json.loads(json.dumps(meta, default=str)))
    return stage, stage_dir, counts
