"""The SFT stage (docs/method.md stage 1) and the policy-init stage (stage 4) from a config.

Data sources (`config.data.source`):
- `synthetic` (the default): the bundled synthetic world, generated on first use under
  WORKDIR/data/ (`data.world` names another world directory), built into tfds data and read by
  a `Curriculum` (short answers, then long answers); the vocabulary, special ids and `<image>`
  id come from the world's tokenizer. Evaluation: held-out video QA answered by greedy decoding
  and graded by the world's scorer, with the blind baseline (videos shuffled) and chance.
- `build`: an instruction build made by `python -m rlaif_jax.data.build` (`data.build_dir`,
  `data.tokenizer`), read by the same curriculum; no scorer, so no QA evaluation.
- `reverse`: a reverse-the-string text task for the engine alone (exact match by teacher forcing).
"""

from __future__ import annotations

import concurrent.futures
import json
import os

import jax
from transformers import AutoTokenizer

from rlaif_jax.data import prepare
from rlaif_jax.data.pipeline import Curriculum, phase_splits
from rlaif_jax.data.reverse_task import ReverseTask
from rlaif_jax.engine import optim
from rlaif_jax.engine.loop import Stage, train
from rlaif_jax.engine.model_init import build_model, lora_of, starting_variables
from rlaif_jax.engine.state import init_state, plan_state, state_from_variables
from rlaif_jax.engine.step import make_eval_fn, make_train_step
from rlaif_jax.eval.synthetic_qa import HeldOutQA
from rlaif_jax.models.video_llm import validate_batch
from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.parallel.sharding import global_batch, local_rows, make_rules
from rlaif_jax.sft.loss import make_sft_eval, make_sft_loss
from rlaif_jax.sft.vision_pretrain import pretrained_tower
from rlaif_jax.workdir.files import atomic_write_json
from rlaif_jax.workdir.layout import resolve_init, stage_dir

TRAIN_KEYS = ("input_ids", "attention_mask", "labels", "frames", "has_video")

# ---------------------------------------------------------------------------------------------
# Data

class CurriculumData:
    """The loop's data source over a `Curriculum`: this process's rows of step k (the pipelines
    slice by jax.process_index()), the next `prefetch` steps prepared in threads, every batch
    checked on the host against the model (ids inside the vocabulary, one placeholder a row)."""

    def __init__(self, curriculum, model_config=None, prefetch: int = 2):
        self.curriculum, self.model_config, self.prefetch = curriculum, model_config, prefetch
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, prefetch))
        self._pending: dict[int, concurrent.futures.Future] = {}

    def _make(self, step: int) -> dict:
        batch = self.curriculum.batch(step)
        out = {k: batch[k] for k in TRAIN_KEYS}
        if self.model_config is not None:
            validate_batch(out, self.model_config)
        return out

    def batch(self, step: int) -> dict:
        """This process's rows of step `step` (the pipelines slice by process)."""
        future = self._pending.pop(step, None)
        for stale in [s for s in self._pending if s < step]:
            self._pending.pop(stale).cancel()
        for ahead in range(step + 1, min(step + 1 + self.prefetch, self.curriculum.total_steps)):
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self._make, ahead)
        return future.result() if future is not None else self._make(step)

def curriculum_steps(curriculum, num_steps: int) -> list[tuple[str, int]]:
    """(split, fraction) pairs -> (split, steps) summing to num_steps (the last takes the rest)."""
    pairs = [(str(split), float(fraction)) for split, fraction in curriculum]
    if not pairs or any(f <= 0 for _, f in pairs):
        raise ConfigError(f"data.curriculum={curriculum!r}: need (split, fraction > 0) pairs")
    total = sum(f for _, f in pairs)
    steps, used = [], 0
    for i, (split, fraction) in enumerate(pairs):
        n = num_steps - used if i == len(pairs) - 1 else int(round(num_steps * fraction / total))
        if n <= 0:
            raise ConfigError(f"data.curriculum={curriculum!r} gives split {split!r} no step of "
                              f"num_steps={num_steps}")
        steps.append((split, n))
        used += n
    return steps

def _load_tokenizer(path: str):
    if not os.path.isdir(path):
        raise ConfigError(f"tokenizer directory {path} does not exist")
    return AutoTokenizer.from_pretrained(path)

class SyntheticSources:
    """Where the synthetic world and its builds live, made on first use (data/prepare.py)."""

    def __init__(self, config):
        data = config.data
        root = os.path.join(os.path.abspath(config.workdir), "data")
        self.world = os.path.abspath(data.world) if data.world else os.path.join(root, "world")
        args = data.world_args.to_dict()
        if data.world:  # a world of its own: its builds live under the workdir, by its name
            root = os.path.join(root, os.path.basename(self.world.rstrip("/")))
        frames, size = int(args["frames"]), int(args["size"])
        try:
            prepare.prepare_world(self.world, args, progress=config.log.progress)
            self.train = prepare.prepare_build(self.world, os.path.join(root, data.train_build),
                                               "instruction", dict(data.train_files), frames, size)
            self.eval = None
            if config.eval.qa_files:
                self.eval = prepare.prepare_build(self.world, os.path.join(root, "eval"), "qa",
                                                  dict(config.eval.qa_files), frames, size)
        except ValueError as e:  # a world or build that does not match the config
            raise ConfigError(str(e)) from None
        self.tokenizer = _load_tokenizer(os.path.join(self.world, "tokenizer"))

def training_curriculum(config, build_dir: str, tokenizer):
    schedule = curriculum_steps(config.data.curriculum, config.num_steps)
    try:
        lengths = {split: config.data.max_length
                   for phase, _ in schedule for split in phase_splits(phase)}
        lengths.update({str(s): int(n) for s, n in config.data.split_max_length})
        return Curriculum(build_dir, schedule, tokenizer, config.batch_size, lengths,
                          seed=config.seed)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"data: {str(e).strip(chr(34))}") from None

# ---------------------------------------------------------------------------------------------
# Evaluation

def sft_eval_loop(eval_fn, data, num_examples: int, batch_size: int, mesh) -> dict:
    """Held-out loss, token accuracy and exact match by teacher forcing (every answer token the
    argmax, which is exactly when greedy decoding reproduces the answer) over the first
    `num_examples` rows of an index-based task (`data.rows(indices)`)."""
    totals: dict = {}
    for first in range(0, num_examples, batch_size):
        rows = data.rows(range(first, first + batch_size))
        sums = jax.device_get(eval_fn(global_batch(local_rows(rows), mesh)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    weight = max(totals["weight"], 1.0)
    return {"eval/loss": totals["loss"] / weight, "eval/token_accuracy": totals["accuracy"] / weight,
            "eval/exact_match": totals["exact"] / max(totals["sequences"], 1.0)}

def make_qa_evaluation(config, model, sources: SyntheticSources, layout, stage_dir: str):
    """evaluate(state, frozen) -> eval/... metrics of held-out QA (synthetic_qa.HeldOutQA);
    every answer is written to eval_answers_<step>.json."""
    e = config.eval
    held_out = HeldOutQA(model, sources.world, sources.eval, e.qa_files, sources.tokenizer,
                         e.batch_size, config.data.max_length, e.max_new_tokens, e.num_qa,
                         e.num_describe, layout.mesh, layout.rules, examples=None)

    def evaluate(state, frozen):
        metrics, shown = held_out(optim.merge_trees(state.params, frozen), blind=e.blind)
        if jax.process_index() == 0:
            step = int(jax.device_get(state.step))
            atomic_write_json(os.path.join(stage_dir, f"eval_answers_{step}.json"), shown)
            for answer in shown[:e.show]:
                print(f"  Q {answer['question']!r} -> {answer['answer']!r} "
                      f"(reference {answer['reference']!r})", flush=True)
        return metrics

    return evaluate

# ---------------------------------------------------------------------------------------------
# The stage

def check_batch_config(config, mesh):
    rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % (rows_split * config.accum_steps):
        raise ConfigError(
            f"batch_size={config.batch_size} must be a multiple of data*fsdp*accum_steps = "
            f"{mesh.shape['data']}*{mesh.shape['fsdp']}*{config.accum_steps}")
    if config.eval.batch_size % rows_split:
        raise ConfigError(f"eval.batch_size={config.eval.batch_size} must be a multiple of "
                          f"data*fsdp = {rows_split}")

def pretrained_vision_tower(config, model, sources: SyntheticSources) -> dict:
    """The tiny tower pre-trained on the synthetic world (sft/vision_pretrain.py), cached
    beside the world's builds. It must stay fixed in SFT (`model.freeze_vision`): trained through
    the LLM's loss it collapses to a video-independent constant (docs/log/training.md)."""
    if not model.config.freeze_vision:
        raise ConfigError("vision_pretrain.steps > 0 needs model.freeze_vision=True: the LLM's "
                          "loss would undo the pre-training (docs/log/training.md)")
    settings = config.vision_pretrain
    cache = os.path.join(os.path.dirname(sources.train), "vision_tower")
    return pretrained_tower(cache, sources.world, model.config.vision, model.config.num_frames,
                            settings.steps, settings.batch_size, settings.lr, config.seed,
                            progress=config.log.progress)

def build_sft_stage(config, mesh) -> Stage:
    check_batch_config(config, mesh)
    source = config.data.source
    if source not in ("synthetic", "build", "reverse"):
        raise ConfigError(f"data.source={source!r}: expected 'synthetic', 'build' or 'reverse'")
    if source != "reverse" and config.model_kind != "video_llm":
        raise ConfigError(f"data.source={source!r} needs model_kind='video_llm'")
    directory = stage_dir(config.workdir, config.stage)
    init = resolve_init(config.workdir, config.init)
    sources = tokenizer = None
    if source == "synthetic":
        sources = SyntheticSources(config)
        tokenizer = sources.tokenizer
    elif source == "build":
        if not (config.data.build_dir and config.data.tokenizer):
            raise ConfigError("data.source='build' needs data.build_dir and data.tokenizer")
        tokenizer = _load_tokenizer(config.data.tokenizer)

    model, init_variables = build_model(config, tokenizer)
    rules = make_rules(config.rules)
    tx, schedule = optim.make_optimizer(config.optim, config.num_steps)
    layout = plan_state(init_variables, tx, mesh, rules, config.trainable, config.frozen,
                        config.max_replicated_share)
    step = make_train_step(make_sft_loss(model), layout, schedule, config.accum_steps)

    if source == "reverse":
        common = dict(length=config.data.reverse_length, symbols=config.data.reverse_symbols,
                      seed=config.seed)
        train_data = ReverseTask(config.batch_size, split="train", **common)
        held_out = ReverseTask(config.eval.batch_size, split="eval", **common)
        if train_data.vocab_needed > model.config.vocab_size:
            raise ConfigError(f"data.source='reverse' needs vocab_size >= "
                              f"{train_data.vocab_needed}; model.vocab_size is "
                              f"{model.config.vocab_size}")
        eval_fn = make_eval_fn(make_sft_eval(model), layout)

        def evaluate(state, frozen):
            return sft_eval_loop(lambda batch: eval_fn(state.params, frozen, batch), held_out,
                                 config.eval.num_examples, config.eval.batch_size, mesh)
    else:
        build_dir = sources.train if sources else config.data.build_dir
        train_data = CurriculumData(training_curriculum(config, build_dir, tokenizer),
                                    model.config)
        evaluate = None
        if sources is not None and config.eval.qa_files:
            evaluate = make_qa_evaluation(config, model, sources, layout, directory)

    tower = None
    if not init and sources is not None and config.vision_pretrain.steps > 0:
        tower = pretrained_vision_tower(config, model, sources)

    def fresh_state():
        rng = jax.random.PRNGKey(config.seed)
        if not init and tower is not None:
            variables = starting_variables("", layout, init_variables, config.seed)
            variables["params"]["vision"] = tower
            return state_from_variables(layout, variables, rng)
        if not init:
            return init_state(layout, init_variables, rng)
        variables = starting_variables(init, layout, init_variables, config.seed,
                                       config.init_adapter)
        return state_from_variables(layout, variables, rng)

    lora = lora_of(model)
    meta = {"init": os.path.abspath(init) if init else "", "seed": config.seed,
            "lora": {"rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets},
            "config": config.to_dict()}
    return Stage(name=config.stage, layout=layout, train_step=step, data=train_data,
                 num_steps=config.num_steps, fresh_state=fresh_state, evaluate=evaluate,
                 meta=json.loads(json.dumps(meta, default=str)))

def run(config, mesh) -> dict:
    """The SFT (or policy-init) stage into WORKDIR/<config.stage>; its last metrics."""
    return train(build_sft_stage(config, mesh), stage_dir(config.workdir, config.stage), config)
