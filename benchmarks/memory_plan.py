"""Memory plan of the real PPO job: per-device bytes of its compiled pieces, ahead of time.

The `configs/ppo.py:vicuna7b` preset (7B video policy + reference adapter, 13B RM + value model,
CLIP-L/336 towers, 50 frames -> 626 video tokens, prompts of 128, responses of 896) is lowered
and compiled, without running, for a target, and `memory_analysis()` gives each device's bytes:

- `ppo_train`: one optimizer step of PPO (policy + value losses over a minibatch of 128 rollouts
  in train micro-batches, one clip, one AdamW update), state donated;
- `ppo_experience`: one rollout micro-batch's old and reference log-probs, values and RM scores;
- `rollout`: sampling a rollout micro-batch (prefill + while-loop decode over a KV cache);
- `sft`: the SFT step of the 7B text LLaMA (LoRA) at sequence 2048, for comparison.

Targets: TPU topologies compiled on this CPU with `jax[tpu]` (e.g. `v5e:2x4` = 8 v5e chips of
16 GiB; `v4:2x2x2` = 8 v4 chips of 32 GiB in megacore mode), the local GPUs (`gpu`), or `cpu:N`
fake CPU devices: XLA:CPU's buffer assignment, an ESTIMATE only (labelled so).

    # TPU (a separate venv with jax[tpu]; see docs/benchmarks.md)
    /work/tpuvenv/bin/python -m benchmarks.memory_plan --target v5e:2x4 --pieces ppo_train
    python -m benchmarks.memory_plan --target cpu:8 --layers 2   # a quick fake-device check

One JSON object a line: the target, the piece, the settings that shaped it (remat policy,
micro-batches, frozen-base dtype) and the per-device bytes (arguments, outputs, aliased,
temporaries; `peak_gib` = arguments + outputs - aliased + temporaries) and whether it fits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# Usable memory a device, GiB (for the "fits" column): what the TPU compiler reports as
# available HBM for v5e (16 GiB chips) and v4 (32 GiB), nvidia-smi's total for H100/H200; the
# others are nominal.
CHIP_GIB = {"v5e": 15.75, "v5 lite": 15.75, "v4": 30.75, "v5p": 95, "v6e": 32, "v6 lite": 32,
            "h100": 79.6, "h200": 139.8}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="cpu:8",
                   help="TPU topology 'v5e:2x4' / 'v4:2x2x2', 'gpu', or 'cpu:N' (estimate)")
    p.add_argument("--pieces", default="ppo_train,ppo_experience,rollout",
                   help="comma-separated of ppo_train, ppo_experience, rollout, sft")
    p.add_argument("--remat", default="dots_no_batch", help="LLM remat policy (both models)")
    p.add_argument("--attention_impl", default="auto",
                   help="LlamaConfig.attention_impl of both LLMs (e.g. splash, xla); auto picks "
                        "by the platform jax runs on (CPU when compiling for a TPU topology)")
    p.add_argument("--train_micro_batch", type=int, default=16)
    p.add_argument("--rollout_micro_batch", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=896)
    p.add_argument("--prompt_length", type=int, default=128)
    p.add_argument("--frozen_dtype", default="bfloat16",
                   help="dtype the frozen bases are stored in (float32 = the presets' params)")
    p.add_argument("--layers", type=int, default=0, help="0: the real depths (32 / 40)")
    p.add_argument("--fsdp", type=int, default=-1)
    p.add_argument("--tensor", type=int, default=1)
    p.add_argument("--memory_gib", type=float, default=0, help="per-device memory; 0: by target")
    p.add_argument("--max_replicated_share", type=float, default=-1.0,
                   help="the start-up check's limit on replicated parameter bytes; -1: the "
                        "preset's (2%%)")
    return p.parse_args(argv)


def _setup_platform(target: str):
    """Must run before jax is imported: fake CPU devices, or no local TPU runtime needed."""
    if target.startswith("cpu:"):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={target[4:]}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    elif target != "gpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices need no TPU
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # quiets libtpu's probing
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def target_devices(target: str):
    import jax

    if target.startswith("cpu:"):
        return jax.devices("cpu"), True
    if target == "gpu":
        return jax.devices("gpu"), False
    from jax.experimental import topologies

    extra = {"chip_config_name": "megacore"} if target.startswith("v4") else {}
    topology = topologies.get_topology_desc(topology_name=target, platform="tpu", **extra)
    return list(topology.devices), False


def chip_gib(device, target: str) -> float:
    kind = getattr(device, "device_kind", "").lower()
    for name, gib in CHIP_GIB.items():
        if name in kind or target.lower().startswith(name):
            return gib
    return 0.0


def ppo_config(args):
    from configs import ppo as ppo_configs

    config = ppo_configs.get_config("vicuna7b")
    with config.unlocked():
        for model in (config.model, config.critic_model):
            model.llm.remat_policy = args.remat
            model.llm.attention_impl = args.attention_impl
            if args.layers:
                model.llm.num_layers = args.layers
                model.vision.num_layers = min(model.vision.num_layers, args.layers + 1)
        config.ppo.train_micro_batch = args.train_micro_batch
        config.ppo.rollout_micro_batch = args.rollout_micro_batch
        config.ppo.max_new_tokens = args.max_new_tokens
        config.ppo.prompt_bucket = args.prompt_length
        config.mesh.update(dict(data=1, fsdp=args.fsdp, tensor=args.tensor))
    return config


def build_ppo(args, devices):
    """The PPO trainer of the vicuna7b preset for these devices, and its abstract inputs."""
    import jax
    import jax.numpy as jnp

    from rlaif_jax.models.video_llm import VideoLLM, VideoLLMConfig
    from rlaif_jax.parallel.mesh import make_mesh
    from rlaif_jax.parallel.sharding import make_rules
    from rlaif_jax.ppo.trainer import PPOTrainer, ppo_optimizer, settings_from_config
    from rlaif_jax.ppo.actor_critic import ActorCritic
    from rlaif_jax.engine.state import plan_state

    config = ppo_config(args)
    policy = VideoLLM(VideoLLMConfig.from_dict(config.model))
    critic = VideoLLM(VideoLLMConfig.from_dict(config.critic_model))
    models = ActorCritic(policy=policy, critic=critic, critic_shares_base=False)
    settings = settings_from_config(config, eos_token_id=2, pad_token_id=0)
    tx, schedule = ppo_optimizer(config, settings)
    mesh = make_mesh(config.mesh, devices)
    layout = plan_state(models.init_variables, tx, mesh, make_rules(config.rules),
                        models.trainable_regex(), max_replicated_share=(
                            config.max_replicated_share if args.max_replicated_share < 0
                            else args.max_replicated_share))
    # The frozen bases may be stored in a narrower dtype than the presets' float32 params.
    frozen_dtype = jnp.dtype(args.frozen_dtype)
    frozen = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(
            a.shape, frozen_dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,
            sharding=s),
        layout.abstract_frozen, layout.frozen_shardings)
    trainer = PPOTrainer(models, layout, settings, schedule, rm_suffix=list(range(3, 67)))
    return config, models, settings, layout, trainer, frozen


def _batch_struct(mesh, shape, dtype):
    import jax

    from rlaif_jax.parallel.sharding import batch_sharding

    return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))


def ppo_rows(config, models, settings, mesh, rows: int) -> dict:
    """Abstract rollout rows as the trainer sees them (video tokens computed once)."""
    import jax.numpy as jnp

    prompt, new = settings.prompt_bucket, settings.max_new_tokens
    n = models.policy.config.num_video_tokens
    hidden = models.policy.config.llm.hidden_size
    critic_hidden = models.critic.config.llm.hidden_size
    dtype = models.policy.config.llm.compute_dtype
    return {
        "prompt_ids": _batch_struct(mesh, (rows, prompt), jnp.int32),
        "prompt_mask": _batch_struct(mesh, (rows, prompt), jnp.int32),
        "response": _batch_struct(mesh, (rows, new), jnp.int32),
        "mask": _batch_struct(mesh, (rows, new), jnp.int32),
        "has_video": _batch_struct(mesh, (rows,), jnp.bool_),
        "video_tokens": _batch_struct(mesh, (rows, n, hidden), dtype),
        "critic_video_tokens": _batch_struct(mesh, (rows, n, critic_hidden), dtype),
    }


def compile_piece(piece: str, args, built):
    """Lowers and compiles one piece; returns (compiled, settings of it)."""
    import jax
    import jax.numpy as jnp

    config, models, settings, layout, trainer, frozen = built
    mesh = layout.mesh
    from rlaif_jax.parallel.sharding import mesh_context

    state = layout.abstract_state_sharded
    if piece == "ppo_train":
        rows = ppo_rows(config, models, settings, mesh, settings.minibatch_size)
        for key in ("old_logprobs", "old_values", "advantages", "returns"):
            rows[key] = _batch_struct(mesh, (settings.minibatch_size, settings.max_new_tokens),
                                      jnp.float32)
        compiled = trainer.train_step.lower(state, frozen, rows).compile()
        return compiled, {"minibatch": settings.minibatch_size,
                          "train_micro_batch": settings.train_micro_batch}
    if piece == "ppo_experience":
        rows = ppo_rows(config, models, settings, mesh, settings.rollout_micro_batch)
        with mesh_context(mesh, layout.rules):
            compiled = trainer._experience.lower(state.params, frozen, rows).compile()
        return compiled, {"rollout_micro_batch": settings.rollout_micro_batch}
    if piece == "rollout":
        from rlaif_jax.sampling.generate import _generate_jit, decoder_for
        from rlaif_jax.parallel.sharding import mesh_context
        from rlaif_jax.engine.optim import merge_trees

        rows = ppo_rows(config, models, settings, mesh, settings.rollout_micro_batch)
        tree = merge_trees(state.params, frozen)
        variables = models.policy_variables(tree)
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        with mesh_context(mesh, trainer.rollout_rules):
            compiled = _generate_jit.lower(
                decoder_for(models.policy), variables, rows["prompt_ids"], rows["prompt_mask"],
                rows["video_tokens"], rows["has_video"], rng, sampling=trainer.sampling,
                mesh=mesh, rules=tuple(trainer.rollout_rules)).compile()
        return compiled, {"rollout_micro_batch": settings.rollout_micro_batch,
                          "cache_slots": settings.prompt_bucket + models.policy.config.num_video_tokens
                          - 1 + settings.max_new_tokens - 1}
    raise ValueError(f"unknown piece {piece!r}")


def sft_piece(args, devices):
    from benchmarks.sft_memory import sft_step_memory

    return sft_step_memory("vicuna7b", fsdp=args.fsdp, tensor=args.tensor, layers=args.layers,
                           devices=devices)


def record_of(compiled) -> dict:
    memory = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {f: int(getattr(memory, f)) for f in fields}
    peak = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
            - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    out["peak_gib"] = round(peak / 2**30, 2)
    return out


def main(argv=None):
    args = _args(argv)
    if "jax" not in sys.modules:
        _setup_platform(args.target)
    devices, estimate = target_devices(args.target)
    memory_gib = args.memory_gib or chip_gib(devices[0], args.target)
    common = {"target": args.target, "device_kind": getattr(devices[0], "device_kind", ""),
              "devices": len(devices), "estimate": estimate, "remat": args.remat,
              "attention_impl": args.attention_impl,
              "frozen_dtype": args.frozen_dtype, "layers": args.layers or "real",
              "memory_gib": memory_gib}
    pieces = [p for p in args.pieces.split(",") if p]
    built = None
    for piece in pieces:
        started = time.perf_counter()
        try:
            if piece == "sft":
                result = sft_piece(args, devices)
                record = {**common, "piece": "sft", **result}
                record["peak_gib"] = result["peak_estimate_gib"]
            else:
                if built is None:
                    built = build_ppo(args, devices)
                compiled, shape = compile_piece(piece, args, built)
                record = {**common, "piece": piece, **shape, **record_of(compiled),
                          "mesh": dict(built[3].mesh.shape)}
        except Exception as error:  # one piece failing (e.g. out of memory) keeps the others
            record = {**common, "piece": piece, "error": f"{type(error).__name__}: "
                      f"{str(error).splitlines()[0][:300]}"}
            # The TPU compiler refuses a program that cannot fit, naming what it needed.
            needed = re.search(r"HLO temporaries \(([\d.]+)G\)", str(error))
            if needed:
                record.update(temp_required_gib=float(needed.group(1)), fits=False)
        record["compile_s"] = round(time.perf_counter() - started, 1)
        if piece != "sft" and built is not None:
            record.update(train_micro_batch=built[2].train_micro_batch or built[2].minibatch_size)
        if memory_gib and "peak_gib" in record:
            record["fits"] = record["peak_gib"] <= memory_gib
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
