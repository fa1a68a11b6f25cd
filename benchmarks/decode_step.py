"""Bytes one KV-cache decode step moves, from an ahead-of-time compile (nothing runs).

One decode step of a LLaMA: a token per row goes in at one cache slot, attends over the whole
cache, and the next logits come out; the cache is donated, as in the sampler's loop. The
compiler's `cost_analysis()` gives bytes accessed and FLOPs, `memory_analysis()` the
temporaries. The floor is the weights read once plus the KV cache read once, in the cache's
dtype: a step that copies the cache (re-stacking it, or rewriting a layer's slice) shows up as
bytes accessed well above it and temporaries the size of the cache. XLA's cost analysis prices
a while loop's body once, so bytes and FLOPs are complete only with unscanned layers (the
default here); with --scan_layers 1 (the presets' layout, what the sampler runs) they count
one layer, and the temporaries are the check that no whole-cache copy is left. The TPU cost
model charges a skinny matmul about 5x its weights' bytes (activations and output per tile), so
a second floor, `matmul_floor_gib`, charges each projection what that matmul costs compiled alone.

    python -m benchmarks.decode_step                      # 7B width, 2 layers, on XLA:CPU
    python -m benchmarks.decode_step --preset vicuna7b --rows 32 --slots 1648 --layers 32 \\
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
    p.add_argument("--layers", type=int, default=2, help="0: the preset's depth")
    p.add_argument("--rows", type=int, default=32, help="decode rows (whole mesh)")
    p.add_argument("--slots", type=int, default=1648,
                   help="KV cache slots (1648: the vicuna7b PPO rollout: 128 + 626 - 1 + 896 - 1)")
    p.add_argument("--dtype", default="bfloat16", help="compute and weight dtype")
    p.add_argument("--cache_dtype", default="", help="'' = the compute dtype; or int8")
    p.add_argument("--scan_layers", type=int, default=0,
                   help="1: scanned layers (the presets'); cost analysis then counts one layer")
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
        rows_sharding = su.batch_sharding(mesh, 2)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              params, param_shardings)
        # An int8 cache's scales lack head_dim.
        cache_sharding = lambda a: NamedSharding(
            mesh, nn.logical_to_mesh_axes(su.CACHE_AXES[:a.ndim], rules))
        cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                            sharding=cache_sharding(a)), cache)
    column = jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=rows_sharding)
    cache_mask = jax.ShapeDtypeStruct((rows, slots), jnp.int32, sharding=rows_sharding)

    def step(params, cache, tokens, mask, positions, slot):
        out = model.apply({"params": params}, input_ids=tokens, attention_mask=mask,
                          position_ids=positions, cache=cache, cache_index=slot)
        return out.logits, out.cache

    with su.mesh_context(mesh, rules):
        compiled = jax.jit(step, donate_argnums=1).lower(
            params, cache, column, cache_mask, column,
            jax.ShapeDtypeStruct((), jnp.int32)).compile()
    cost = _costs(compiled)
    memory = compiled.memory_analysis()
    gib = 2.0 ** -30
    chips = len(devices)
    weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    # Per chip: weights split over 'tensor' (replicated over 'data'), the cache over both.
    floor = weight_bytes / tensor + cache_bytes / chips
    matmuls = lone_matmul_bytes(params, rows // data, devices[0])
    matmul_floor = floor + matmuls["charged"] - matmuls["weights"]
    return {"bytes_accessed_gib": round(cost["bytes accessed"] * gib, 3),
            "floor_gib": round(floor * gib, 3),
            "over_floor": round(cost["bytes accessed"] / floor, 2),
            # What the same compiler charges for the step's weight matmuls compiled alone (one
            # chip's shard each), with everything else at the floor: the cost model's own
            # minimum for an XLA matmul decode step.
            "matmul_floor_gib": round(matmul_floor * gib, 3),
            "over_matmul_floor": round(cost["bytes accessed"] / matmul_floor, 2),
            "gflops": round(cost.get("flops", 0.0) / 1e9, 2),
            # XLA prices a while loop's body once: scanned layers count as one layer.
            "loop_body_counted_once": config.scan_layers,
            "temp_gib": round(memory.temp_size_in_bytes * gib, 3),
            "cache_gib_per_chip": round(cache_bytes / chips * gib, 3),
            "weights_gib_per_chip": round(weight_bytes / tensor * gib, 3)}


def _costs(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list) else cost


def lone_matmul_bytes(params, rows: int, device) -> dict:
    """{'weights': bytes of the 2-D projection kernels a chip holds, 'charged': bytes accessed
    the compiler reports for [rows, in] x [in, out] of each kernel's per-chip shard compiled
    alone on `device`}. A skinny matmul is charged well above its weights' bytes on TPU (the
    activations and the output per tile), which no decode step can avoid."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    one = SingleDeviceSharding(device)
    charged_by_shape: dict = {}
    totals = {"weights": 0.0, "charged": 0.0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if leaf.ndim != 2 or not name.endswith("kernel"):
            continue  # embedding (a lookup), norms
        shard = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) \
            else leaf.shape
        key = (tuple(shard), str(leaf.dtype))
        if key not in charged_by_shape:
            x = jax.ShapeDtypeStruct((rows, shard[0]), leaf.dtype, sharding=one)
            w = jax.ShapeDtypeStruct(shard, leaf.dtype, sharding=one)
            charged_by_shape[key] = _costs(jax.jit(jnp.matmul).lower(x, w).compile())[
                "bytes accessed"]
        totals["weights"] += shard[0] * shard[1] * leaf.dtype.itemsize
        totals["charged"] += charged_by_shape[key]
    return totals


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
