"""Per-device memory of a real-size SFT step from an ahead-of-time compile.

Lowers and compiles the `configs/sft.py` preset's train step (AdamW, LoRA, accumulation, the
preset's remat policy) for a mesh of N devices and prints `memory_analysis()` as one JSON object
a line. Without accelerators the devices are fake CPU devices, so the numbers are ESTIMATES of
XLA:CPU's buffer assignment (labelled "estimate": true); on a TPU/GPU host they are the real
compiler's.

    python -m benchmarks.sft_memory [--preset vicuna7b] [--devices 8] [--fsdp 8] [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vicuna7b")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (CPU only)")
    parser.add_argument("--data", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=-1)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--layers", type=int, default=0, help="0: the preset's depth")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=0, help="0: the preset's global batch")
    parser.add_argument("--accum", type=int, default=0, help="0: the preset's accum_steps")
    parser.add_argument("--text_only", action="store_true", help="the LLM of a video preset alone")
    return parser.parse_args(argv)


def sft_step_memory(preset: str, data: int = 1, fsdp: int = -1, tensor: int = 1,
                    layers: int = 0, seq_len: int = 2048, batch: int = 0, accum: int = 0,
                    text_only: bool = False, devices=None) -> dict:
    """Compiles the preset's SFT step for `devices` (default: this host's); returns
    memory_analysis() fields in bytes per device, and what was compiled. A video preset compiles the whole video LLM
    (CLIP on every frame, projector, pooling, LLM over seq_len + video tokens - 1) unless
    `text_only`; `layers` sets the LLM's depth."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from configs import sft as sft_configs
    from rlaif_jax.parallel.mesh import make_mesh
    from rlaif_jax.parallel.sharding import BATCH_AXES, make_rules
    from rlaif_jax.engine import model_init, optim
    from rlaif_jax.sft import loss as sft
    from rlaif_jax.engine.state import plan_state
    from rlaif_jax.engine.step import make_train_step

    config = sft_configs.get_config(preset)
    video = config.model_kind == "video_llm" and not text_only
    with config.unlocked():
        config.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor))
        if config.model_kind == "video_llm" and text_only:
            # The LLM alone (the bulk of the memory), as if the video tokens were text.
            config.model_kind = "llama"
            config.model = config.model.llm
            config.trainable = "lora/.*"
        llm = config.model.llm if video else config.model
        if layers:
            llm.num_layers = layers
        if batch:
            config.batch_size = batch
        if accum:
            config.accum_steps = accum
    model, init_variables = model_init.build_model(config)
    mesh = make_mesh(config.mesh, devices)
    device = mesh.devices.flat[0]
    tx, schedule = optim.make_optimizer(config.optim, config.num_steps)
    layout = plan_state(init_variables, tx, mesh, make_rules(config.rules), config.trainable,
                        config.frozen, config.max_replicated_share)
    step = make_train_step(sft.make_sft_loss(model), layout, schedule, config.accum_steps)
    rows = NamedSharding(mesh, P(BATCH_AXES))
    shape = (config.batch_size, seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)
             for k in ("input_ids", "attention_mask", "labels")}
    if video:
        size, frames = model.config.vision.image_size, model.config.num_frames
        batch["frames"] = jax.ShapeDtypeStruct((config.batch_size, frames, size, size, 3),
                                               jnp.uint8, sharding=rows)
        batch["has_video"] = jax.ShapeDtypeStruct((config.batch_size,), jnp.bool_, sharding=rows)
    frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          layout.abstract_frozen, layout.frozen_shardings)
    compiled = step.lower(layout.abstract_state_sharded, frozen, batch).compile()
    memory = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    result = {f: int(getattr(memory, f)) for f in fields}
    nbytes = lambda tree: sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(tree))
    result.update(
        preset=preset, model=config.model_kind, mesh=dict(mesh.shape),
        devices=mesh.devices.size, platform=device.platform,
        estimate=device.platform == "cpu", num_layers=llm.num_layers,
        global_batch=config.batch_size, accum_steps=config.accum_steps, seq_len=seq_len,
        video_tokens=model.config.num_video_tokens if video else 0,
        trainable_bytes=nbytes(layout.abstract_state.params),
        optimizer_bytes=nbytes(layout.abstract_state.opt_state),
        frozen_bytes=nbytes(layout.abstract_frozen))
    # argument + temp is the peak a device holds (outputs alias the donated state).
    result["peak_estimate_gib"] = round(
        (result["argument_size_in_bytes"] + result["temp_size_in_bytes"]) / 2**30, 3)
    return result


def main(argv=None):
    args = _args(argv)
    if "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    result = sft_step_memory(args.preset, args.data, args.fsdp, args.tensor, args.layers,
                             args.seq_len, args.batch, args.accum, args.text_only)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
