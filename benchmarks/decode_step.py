"""Bytes one KV-cache decode step moves, from an ahead-of-time compile (nothing runs).

One decode step of a LLaMA: a token per row goes in at one cache slot, attends over the whole
cache, and the next logits come out; the cache is donated, as in the sampler's loop. The
compiler's `cost_analysis()` gives bytes accessed and FLOPs, `memory_analysis()` the
temporaries. The floor is the weights read once plus the KV cache read once, in the cache's
dtype: a step that copies the cache (re-stacking it, or rewriting a layer's slice) shows up as
bytes accessed well above it and temporaries the size of the cache. XLA prices a loop body
once, so a scanned model's step is compiled twice (1 and 2 layers an iteration) and the other
layers added from the difference.

    python -m benchmarks.decode_step                      # 7B width, 4 layers, on XLA:CPU
    python -m benchmarks.decode_step --preset vicuna7b --rows 32 --slots 1663 --layers 32 \\
        --target v5e:2x4 --tensor 8                        # per chip, needs jax[tpu]

Targets: `cpu` (XLA:CPU of this host, one device) or a TPU topology name compiled from this
CPU with `jax[tpu]` (docs/benchmarks.md). On a topology the mesh is `--data` x `--tensor`
chips: rows over 'data', heads over 'tensor', and bytes are per chip. One JSON object a line.
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.memory_plan import _setup_platform


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="cpu", help="'cpu' or a TPU topology such as 'v5e:2x4'")
    p.add_argument("--preset", default="vicuna7b", help="a configs/models.py LLaMA preset")
    p.add_argument("--layers", type=int, default=4,
                   help="0: the preset's depth; scanned: even, >= 4")
    p.add_argument("--rows", type=int, default=32, help="decode rows (whole mesh)")
    p.add_argument("--slots", type=int, default=1663, help="KV cache slots")
    p.add_argument("--dtype", default="bfloat16", help="compute and weight dtype")
    p.add_argument("--cache_dtype", default="", help="'' = the compute dtype; or int8")
    p.add_argument("--scan_layers", type=int, default=1)
    p.add_argument("--data", type=int, default=1)
    p.add_argument("--tensor", type=int, default=1)
    return p.parse_args(argv)


def llama_config(preset: str, layers: int, dtype: str):
    from configs import models
    from rlaif_jax.models.llama import LlamaConfig

    values = models.get_config(preset).to_dict()
    if layers:
        values["num_layers"] = layers
    values.update(dtype=dtype, param_dtype=dtype)
    return LlamaConfig.from_dict(values)


def decode_step_costs(config, rows: int, slots: int, cache_dtype: str = "", devices=None,
                      data: int = 1, tensor: int = 1) -> dict:
    """Compiles one decode step; returns bytes accessed, FLOPs, temporaries and the floor, per
    device (GiB). `devices`: the mesh's devices (default: one local device)."""
    # jax is imported here, after main() chose the platform (fake CPU devices, compile-only TPU).
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from rlaif_jax.models.llama import Llama, init_cache
    from rlaif_jax.parallel import sharding as su
    from rlaif_jax.parallel.mesh import make_mesh

    model = Llama(config)
    devices = list(devices or jax.devices()[:1])[:data * tensor]
    mesh = make_mesh({"data": data, "fsdp": 1, "tensor": tensor}, devices) \
        if len(devices) > 1 else None
    rules = su.make_rules([("embed", None)])  # decode: whole weights a chip, no gathers
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    params = nn.unbox(boxed["params"])
    cache = jax.eval_shape(lambda: init_cache(config, rows, slots, cache_dtype or None))
    rows_sharding = None
    if mesh is not None:
        param_shardings = su.mesh_shardings(boxed["params"], mesh, rules)
        cache_sharding = NamedSharding(mesh, nn.logical_to_mesh_axes(su.CACHE_AXES, rules))
        rows_sharding = su.batch_sharding(mesh, 2)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              params, param_shardings)
        cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                            sharding=cache_sharding), cache)
    column = jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=rows_sharding)
    cache_mask = jax.ShapeDtypeStruct((rows, slots), jnp.int32, sharding=rows_sharding)

    def compile_step(unroll: int):
        step_model = Llama(config if unroll == 1 else config.replace(scan_unroll=unroll))

        def step(params, cache, tokens, mask, positions, slot):
            out = step_model.apply({"params": params}, input_ids=tokens, attention_mask=mask,
                                   position_ids=positions, cache=cache, cache_index=slot)
            return out.logits, out.cache

        with su.sharding_context(mesh, rules):
            compiled = jax.jit(step, donate_argnums=1).lower(
                params, cache, column, cache_mask, column,
                jax.ShapeDtypeStruct((), jnp.int32)).compile()
        cost = compiled.cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost), compiled.memory_analysis()

    cost, memory = compile_step(1)
    totals = {key: cost.get(key, 0.0) for key in ("bytes accessed", "flops")}
    if config.scan_layers:
        if config.num_layers < 4 or config.num_layers % 2:
            # Two layers an iteration of a 2-layer loop is no loop at all: a different program.
            raise ValueError("a scanned step is priced from loops of >= 2 iterations: give an "
                             f"even number of layers >= 4, not {config.num_layers}")
        # XLA's cost analysis counts a while loop's body once: a scanned step is priced as one
        # layer. Two layers an iteration price one more layer; add the other L - 1.
        two, _ = compile_step(2)
        for key in totals:
            totals[key] += (config.num_layers - 1) * (two.get(key, 0.0) - cost.get(key, 0.0))
    gib = 2.0 ** -30
    chips = len(devices)
    weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    # Per chip: weights split over 'tensor' (replicated over 'data'), the cache over both.
    floor = weight_bytes / tensor + cache_bytes / chips
    return {"bytes_accessed_gib": round(totals["bytes accessed"] * gib, 3),
            "floor_gib": round(floor * gib, 3),
            "over_floor": round(totals["bytes accessed"] / floor, 2),
            "gflops": round(totals["flops"] / 1e9, 2),
            "temp_gib": round(memory.temp_size_in_bytes * gib, 3),
            "cache_gib_per_chip": round(cache_bytes / chips * gib, 3),
            "weights_gib_per_chip": round(weight_bytes / tensor * gib, 3)}


def main(argv=None):
    args = _args(argv)
    if "jax" not in sys.modules:
        _setup_platform(args.target if args.target != "cpu" else "cpu:1")
    from benchmarks.memory_plan import target_devices

    devices, _ = target_devices(args.target if args.target != "cpu" else "cpu:1")
    config = llama_config(args.preset, args.layers, args.dtype).replace(
        scan_layers=bool(args.scan_layers))
    record = {"target": args.target, "device_kind": getattr(devices[0], "device_kind", ""),
              "preset": args.preset, "layers": config.num_layers, "rows": args.rows,
              "slots": args.slots, "dtype": args.dtype,
              "cache_dtype": args.cache_dtype or args.dtype, "scan_layers": config.scan_layers,
              "data": args.data, "tensor": args.tensor}
    record.update(decode_step_costs(config, args.rows, args.slots, args.cache_dtype, devices,
                                    args.data, args.tensor))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
