"""Stage 1 (and 4): supervised fine-tuning, cross entropy on the assistant's tokens.

The loss is summed over labelled tokens and weighted by their count (see train/step.py), so
gradient accumulation and any sharding of the batch give the same update as one big batch.
Labels follow transformers' shift: the logit at t - 1 predicts labels[t]; -100 means no loss.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def model_logits(model: Any, variables: Any, batch: Mapping[str, jax.Array],
                 compute_logits: bool = True):
    """Forward pass of a text LLaMA or a video LLM on a batch of DESIGN.md's format."""
    if hasattr(model, "encode_video"):
        return model.apply(variables, batch["input_ids"], batch["attention_mask"],
                           frames=batch.get("frames"), has_video=batch.get("has_video"),
                           compute_logits=compute_logits).logits
    return model.apply(variables, input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"],
                       compute_logits=compute_logits).logits


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> dict:
    """Sums over the labelled tokens of `labels` (aligned with the inputs, shifted here):
    'loss' (summed NLL), 'accuracy' (summed argmax hits), 'weight' (token count),
    'exact' and 'sequences' (rows whose every labelled token is the argmax, and rows with
    any label: greedy decoding reproduces the reference answer iff the row is exact)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = jnp.where(mask, targets, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = (logz - picked) * mask
    hits = (jnp.argmax(logits, axis=-1) == safe) & mask
    has_label = mask.any(axis=-1)
    row_exact = jnp.all(hits | ~mask, axis=-1) & has_label
    return {"loss": nll.sum(), "accuracy": hits.sum().astype(jnp.float32),
            "weight": mask.sum().astype(jnp.int32),
            "exact": row_exact.sum().astype(jnp.float32),
            "sequences": has_label.sum().astype(jnp.float32)}


def make_sft_loss(model: Any):
    """loss_fn(variables, batch, rng) -> (loss_sum, sums) for train/step.py."""

    def loss_fn(variables, batch, rng):
        del rng  # no dropout in these models
        sums = token_cross_entropy(model_logits(model, variables, batch), batch["labels"])
        sums.pop("exact"), sums.pop("sequences")
        return sums["loss"], sums

    return loss_fn


def make_sft_eval(model: Any):
    """eval fn(variables, batch) -> sums of token_cross_entropy (for held-out loss/accuracy)."""

    def eval_fn(variables, batch):
        return token_cross_entropy(model_logits(model, variables, batch), batch["labels"])

    return eval_fn


# ---------------------------------------------------------------------------------------------
# The SFT stage: model, data, starting point and evaluation from a config.

import json  # noqa: E402
import os  # noqa: E402

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402

from rlaif_jax.checkpoints import hf  # noqa: E402
from rlaif_jax.checkpoints.orbax_io import read_step_dir, resolve_checkpoint  # noqa: E402
from rlaif_jax.models.llama import Llama, LlamaConfig  # noqa: E402
from rlaif_jax.parallel.mesh import ConfigError  # noqa: E402
from rlaif_jax.parallel.sharding import make_rules  # noqa: E402
from rlaif_jax.train import optim  # noqa: E402
from rlaif_jax.train.loop import Stage  # noqa: E402
from rlaif_jax.train.state import (StateLayout, init_state, mesh_context, place,  # noqa: E402
                                   plan_state, state_from_variables)
from rlaif_jax.train.step import make_eval_fn, make_train_step  # noqa: E402

# Model fields that describe how to run, not what the weights are: a config may set them on top
# of a checkpoint's own config.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "lora")


def build_llama(config) -> Llama:
    model_config = LlamaConfig.from_dict(config.model)
    if config.init:
        kind, path = resolve_checkpoint(config.init)
        if kind == "hf":
            with open(os.path.join(path, "config.json")) as f:
                hf_config = json.load(f)
            runtime = {k: getattr(model_config, k) for k in RUNTIME_FIELDS}
            model_config = hf.llama_config_from_hf(hf_config, **runtime)
    return Llama(model_config)


def build_model(config):
    """(model, init_variables(rng) -> boxed variables)."""
    if config.model_kind == "llama":
        model = build_llama(config)
        return model, lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))
    if config.model_kind == "video_llm":
        try:
            from rlaif_jax.models import video_llm  # noqa: F401  (issue 3)
        except ImportError:
            raise ConfigError("model_kind='video_llm': rlaif_jax.models.video_llm is not "
                              "available in this checkout") from None
        raise ConfigError("model_kind='video_llm' is not wired into the SFT stage yet")
    raise ConfigError(f"model_kind={config.model_kind!r}: expected 'llama' or 'video_llm'")


def _sharding_of(layout: StateLayout, path: str):
    """The sharding of variable `path` ('params/layers/...') in the trainable or frozen tree."""
    for tree in (layout.state_shardings.params, layout.frozen_shardings):
        node = tree
        for part in path.split("/"):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None:
            return node
    raise KeyError(path)


def _random_variables(layout: StateLayout, init_variables, seed: int, collections=None):
    """Freshly initialised variables (only `collections`, e.g. ('lora',)), on their shards."""
    shardings = optim.merge_trees(layout.state_shardings.params, layout.frozen_shardings)
    keep = tuple(collections or shardings)
    with mesh_context(layout.mesh, layout.rules):
        fn = jax.jit(lambda rng: {k: v for k, v in nn.unbox(init_variables(rng)).items()
                                  if k in keep},
                     out_shardings={k: shardings[k] for k in keep})
        return fn(jax.random.PRNGKey(seed))


def starting_variables(init: str, layout: StateLayout, init_variables, seed: int) -> dict:
    """The variables a run starts from: random ('' init), an HF directory's weights (+ a fresh
    LoRA adapter when the model has one) or an earlier stage's checkpoint laid over the base that
    stage started from."""
    if not init:
        return _random_variables(layout, init_variables, seed)
    kind, path = resolve_checkpoint(init)
    abstract = optim.merge_trees(layout.abstract_state.params, layout.abstract_frozen)
    if kind == "hf":
        with open(os.path.join(path, "config.json")) as f:
            hf_config = json.load(f)
        num_layers = hf_config["num_hidden_layers"]
        llama_config = hf.llama_config_from_hf(hf_config)
        params = hf.load_params(
            hf.SafetensorsReader(path), hf.llama_rules(llama_config), abstract["params"],
            num_layers, place=lambda p, a: place(a, _sharding_of(layout, "params/" + p)))
        variables = {"params": params}
        extra = tuple(k for k in abstract if k != "params")
        if extra:
            variables.update(_random_variables(layout, init_variables, seed, extra))
        return variables
    params, meta = read_step_dir(path)
    base = starting_variables(meta.get("init", ""), layout, init_variables,
                              int(meta.get("seed", seed)))
    base_trainable, base_rest = optim.split_trainable(base, _paths_regex(params))
    del base_trainable  # replaced by the checkpoint's values
    return optim.merge_trees(base_rest, params)


def _paths_regex(tree) -> str:
    import re
    paths = ["/".join(str(getattr(k, "key", k)) for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return "|".join(re.escape(p) for p in paths) or "(?!)"


def sft_eval_loop(eval_fn, data, num_examples: int, batch_size: int, mesh) -> dict:
    """Held-out loss, token accuracy and exact match (every answer token the argmax, which is
    exactly when greedy decoding reproduces the answer) over the first `num_examples` rows."""
    from rlaif_jax.train.loop import global_batch
    totals: dict = {}
    for first in range(0, num_examples, batch_size):
        rows = data.rows(range(first, first + batch_size))
        sums = jax.device_get(eval_fn(global_batch(_local_rows(rows), mesh)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    weight = max(totals["weight"], 1.0)
    return {"eval/loss": totals["loss"] / weight, "eval/token_accuracy": totals["accuracy"] / weight,
            "eval/exact_match": totals["exact"] / max(totals["sequences"], 1.0)}


def _local_rows(rows: dict) -> dict:
    count, index = jax.process_count(), jax.process_index()
    per = len(rows["input_ids"]) // count
    return {k: v[index * per:(index + 1) * per] for k, v in rows.items()}


def build_data(config, vocab_size: int):
    if config.data.source == "reverse":
        from rlaif_jax.data.reverse_task import ReverseTask
        common = dict(length=config.data.reverse_length, symbols=config.data.reverse_symbols,
                      seed=config.seed)
        train = ReverseTask(config.batch_size, split="train", **common)
        held_out = ReverseTask(config.eval.batch_size, split="eval", **common)
        if train.vocab_needed > vocab_size:
            raise ConfigError(f"data.source='reverse' needs vocab_size >= {train.vocab_needed}; "
                              f"model.vocab_size is {vocab_size}")
        return train, held_out
    if config.data.source == "synthetic":
        raise ConfigError("data.source='synthetic': the synthetic world is not wired into the SFT "
                          "stage in this checkout")
    raise ConfigError(f"data.source={config.data.source!r}: expected 'synthetic' or 'reverse'")


def check_batch_config(config, mesh):
    rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % (rows_split * config.accum_steps):
        raise ConfigError(
            f"batch_size={config.batch_size} must be a multiple of data*fsdp*accum_steps = "
            f"{mesh.shape['data']}*{mesh.shape['fsdp']}*{config.accum_steps}")
    if config.eval.batch_size % rows_split:
        raise ConfigError(f"eval.batch_size={config.eval.batch_size} must be a multiple of "
                          f"data*fsdp = {rows_split}")


def build_sft_stage(config, mesh) -> Stage:
    check_batch_config(config, mesh)
    model, init_variables = build_model(config)
    rules = make_rules(config.rules)
    tx, schedule = optim.make_optimizer(config.optim, config.num_steps)
    layout = plan_state(init_variables, tx, mesh, rules, config.trainable, config.frozen,
                        config.max_replicated_share)
    step = make_train_step(make_sft_loss(model), layout, schedule, config.accum_steps)
    train_data, eval_data = build_data(config, model.config.vocab_size)
    eval_fn = make_eval_fn(make_sft_eval(model), layout)

    def fresh_state():
        rng = jax.random.PRNGKey(config.seed)
        if not config.init:
            return init_state(layout, init_variables, rng)
        variables = starting_variables(config.init, layout, init_variables, config.seed)
        return state_from_variables(layout, variables, rng)

    def evaluate(state, frozen):
        return sft_eval_loop(lambda batch: eval_fn(state.params, frozen, batch), eval_data,
                             config.eval.num_examples, config.eval.batch_size, mesh)

    meta = {"init": os.path.abspath(config.init) if config.init else "", "seed": config.seed,
            "config": config.to_dict()}
    return Stage(name=config.stage, layout=layout, train_step=step, data=train_data,
                 num_steps=config.num_steps, fresh_state=fresh_state, evaluate=evaluate,
                 meta=json.loads(json.dumps(meta, default=str)))
