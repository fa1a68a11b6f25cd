"""Pre-training the tiny vision tower on the synthetic world: our stand-in for CLIP's pre-training.

LLaVA starts from a CLIP tower pre-trained on 400M image-text pairs and keeps it frozen; the
synthetic world has no such tower. Trained from scratch through the LLM's loss alone, the tiny
tower collapses to a video-independent constant within ~30 steps (docs/log/training.md), so the SFT
model answers from the text prior. Here the tower learns directly what is in the TRAINING
videos (never the eval ones): a linear probe on the pooled features the LLM will see predicts each
video's attributes from `truth.json`. SFT then keeps the tower frozen, as LLaVA does with CLIP.

The attributes are the visual facts the world's questions ask about: how many shapes, and per
shape its colour when it appears and at the end, its motion, when it appears and when it
changes colour (absent shapes have a class of their own). Per frame, each shape's colour and
position (a coarse grid cell) are read from that frame's pooled token: a dense signal that makes
the tower bind colour and place to the shape in every frame, which the per-video labels alone
taught too slowly (motion stayed at its majority-class accuracy after 600 steps).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import time
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from tqdm import tqdm

from rlaif_jax.checkpoints import safetensors_io
from rlaif_jax.data.synthetic import generate as world_files
from rlaif_jax.data.synthetic import render, world
from rlaif_jax.data.video import load_frames
from rlaif_jax.models.clip_vision import ClipVision, ClipVisionConfig
from rlaif_jax.models.video_llm import pool_video_tokens

_ABSENT = 0
# (attribute, number of classes); per-shape attributes reserve class 0 for "no such shape".
SHAPE_ATTRIBUTES = (
    ("colour_start", 1 + len(world.COLOURS)),
    ("colour_end", 1 + len(world.COLOURS)),
    ("motion", 1 + len(world.MOTIONS)),
    ("appears", 2 + len(world.TIME_BUCKETS)),  # absent / from the first frame / later, by third
    ("changes", 2 + len(world.TIME_BUCKETS)),  # absent / never / by third
)
TARGETS = (("count", len(world.SHAPES)),) + tuple(
    (f"{shape}_{name}", classes) for shape in world.SHAPES for name, classes in SHAPE_ATTRIBUTES)
NUM_CLASSES = tuple(classes for _, classes in TARGETS)
POSITION_CELLS = 4  # per axis: where a shape's centre is, in quarters of the frame
# Per frame and shape; class 0: the shape is not in the video or not visible yet.
FRAME_ATTRIBUTES = (("colour", 1 + len(world.COLOURS)), ("x", 1 + POSITION_CELLS),
                    ("y", 1 + POSITION_CELLS))
FRAME_TARGETS = tuple((f"{shape}_frame_{name}", classes)
                      for shape in world.SHAPES for name, classes in FRAME_ATTRIBUTES)
METRICS_FILE = "metrics.json"
PROBE_VERSION = 2  # 2: per-frame colour and position targets; part of the cache's settings


def visual_targets(truth: dict) -> np.ndarray:
    """One class index per entry of TARGETS, from a video's truth."""
    colours, frames = list(world.COLOURS), truth["num_frames"]
    targets = [len(truth["objects"]) - 1]
    for shape in world.SHAPES:
        obj = world.find_object(truth, shape)
        if obj is None:
            targets += [_ABSENT] * len(SHAPE_ATTRIBUTES)
            continue
        appear = obj["appear_frame"]
        appears = 1 if appear == 0 else 2 + world.clip_of_frame(appear, frames)
        change = obj["change_frame"]
        changes = 1 if change is None else 2 + world.clip_of_frame(change, frames)
        targets += [1 + colours.index(world.colour_at(obj, appear)),
                    1 + colours.index(world.colour_at(obj, frames - 1)),
                    1 + world.MOTIONS.index(obj["motion"]), appears, changes]
    return np.asarray(targets, np.int32)


def frame_targets(truth: dict) -> np.ndarray:
    """[frames, len(FRAME_TARGETS)] class indices: each shape's colour and grid cell per frame."""
    colours, frames, size = list(world.COLOURS), truth["num_frames"], truth["size"]

    def cell(coordinate: float) -> int:
        return 1 + min(POSITION_CELLS - 1, max(0, int(coordinate / size * POSITION_CELLS)))

    width = len(FRAME_ATTRIBUTES)
    out = np.zeros((frames, len(FRAME_TARGETS)), np.int32)
    for k, shape in enumerate(world.SHAPES):
        obj = world.find_object(truth, shape)
        if obj is None:
            continue
        for frame in range(frames):
            if not world.is_visible(obj, frame):
                continue
            x, y = world.object_centre(obj, frame, frames, size)
            out[frame, width * k:width * (k + 1)] = (
                1 + colours.index(world.colour_at(obj, frame)), cell(x), cell(y))
    return out


def _is_order_target(name: str) -> bool:
    """Targets that need the order of frames: no average over tokens can hold them."""
    return name.endswith("_motion")


class VisionProbe(nn.Module):
    """The video LLM's tower and pooling, then linear read-outs of the pooled tokens.

    Order-free attributes are read from the MEAN of the pooled tokens: an LLM trained from
    scratch starts out attending about uniformly, so what the mean holds reaches its answer
    positions from the first step (a read-out of the flattened tokens let the tower hide the
    count in one token's channels, and the LLM never found it: docs/log/training.md). Motion needs
    the frames' order, so it is read from the flattened per-frame (temporal) tokens.
    The submodule is named `vision` so its params drop into VideoLLM's `params/vision`.
    """

    config: ClipVisionConfig
    targets: tuple = TARGETS
    frame_targets: tuple = FRAME_TARGETS

    @nn.compact
    def __call__(self, frames: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        """-> (per-video logits [B, classes] for each of TARGETS, per-frame logits
        [B, T, classes] for each of FRAME_TARGETS, read from each frame's temporal token)."""
        batch, num_frames = frames.shape[:2]
        features = ClipVision(self.config, name="vision")(
            frames.reshape((batch * num_frames,) + frames.shape[2:])).features
        tokens = features.reshape((batch, num_frames) + features.shape[1:])
        pooled = pool_video_tokens(tokens, "spatiotemporal").astype(jnp.float32)
        mean = jnp.mean(pooled, axis=1)
        per_frame = pooled[:, :num_frames]
        ordered = per_frame.reshape(batch, -1)
        video = [nn.Dense(classes, name=f"readout_{name}")(
                     ordered if _is_order_target(name) else mean)
                 for name, classes in self.targets]
        frame = [nn.Dense(classes, name=f"readout_{name}")(per_frame)
                 for name, classes in self.frame_targets]
        return video, frame


def probe_loss(logits: tuple[list[jax.Array], list[jax.Array]], targets: dict):
    """Mean cross entropy over every read-out (per-video ones and per-frame ones, each head
    weighted alike), and each head's accuracy (TARGETS, then FRAME_TARGETS)."""
    video_logits, frame_logits = logits
    losses, hits = [], []
    heads = [(head, targets["video"][:, k]) for k, head in enumerate(video_logits)]
    heads += [(head, targets["frame"][:, :, k]) for k, head in enumerate(frame_logits)]
    for head, labels in heads:
        losses.append(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(head, labels)))
        hits.append(jnp.mean((jnp.argmax(head, -1) == labels).astype(jnp.float32)))
    return jnp.mean(jnp.stack(losses)), jnp.stack(hits)


def all_targets(truths: list[dict]) -> dict:
    """{'video': [V, len(TARGETS)], 'frame': [V, T, len(FRAME_TARGETS)]} of the videos' truths."""
    return {"video": np.stack([visual_targets(t) for t in truths]),
            "frame": np.stack([frame_targets(t) for t in truths])}


def load_world_videos(world_dir: str, prefix: str, num_frames: int, size: int,
                      progress: bool = True) -> tuple[np.ndarray, dict]:
    """(frames uint8 [V, T, S, S, 3], `all_targets`) of the world's videos whose name starts
    with `prefix` ('train_' for training, 'eval_' for checks only)."""
    truths = world_files.load_truth(world_dir)
    names = sorted(n for n in truths if n.startswith(prefix))
    if not names:
        raise ValueError(f"no '{prefix}*' videos in the world at {world_dir}")
    frames = [load_frames(os.path.join(world_dir, world_files.video_path(n)), num_frames, size)
              for n in tqdm(names, desc=f"decode {prefix}videos", unit="video",
                            disable=not progress)]
    return np.stack(frames), all_targets([truths[n] for n in names])


def fresh_videos(rng: np.random.Generator, count: int, num_frames: int, size: int
                 ) -> tuple[np.ndarray, dict]:
    """`count` newly drawn videos of the world (rendered, not saved): unlimited pre-training data
    from the world's generator, disjoint from every saved video with probability one."""
    truths = [world.sample_truth(rng, "fresh", num_frames, size, 4) for _ in range(count)]
    return np.stack([render.render_frames(t) for t in truths]), all_targets(truths)


def pretrain_vision(world_dir: str, config: ClipVisionConfig, num_frames: int, steps: int,
                    batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                    progress: bool = True) -> tuple[dict, dict]:
    """Trains the tower + probe on newly drawn videos of the world (never its saved ones).

    Returns (the tower's params, metrics: loss and probe accuracy per attribute on the world's
    saved eval videos, decoded from their mp4 files as the SFT stage sees them).
    """
    size = config.image_size
    probe = VisionProbe(config)
    sample = jnp.zeros((1, num_frames, size, size, config.num_channels), jnp.uint8)
    params = nn.unbox(probe.init(jax.random.PRNGKey(seed), sample)["params"])
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, weight_decay=0.01))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, frames, targets):
        def loss_fn(p):
            return probe_loss(probe.apply({"params": p}, frames), targets)
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, jnp.mean(accuracy)

    # A stream of its own: the world's videos come from default_rng(world seed).
    rng = np.random.default_rng([seed, 0x5EED])
    start = time.time()
    bar = tqdm(range(steps), desc="vision pre-training", unit="step", disable=not progress)
    # Drawing a batch costs about as much as a step on 2 cores: the next batch is drawn on a
    # thread while the step runs (XLA releases the GIL). One thread consumes `rng` in step
    # order, so the batches are the same as drawn inline.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as drawer:
        upcoming = drawer.submit(fresh_videos, rng, batch_size, num_frames, size)
        for step in bar:
            frames, targets = upcoming.result()
            if step + 1 < steps:
                upcoming = drawer.submit(fresh_videos, rng, batch_size, num_frames, size)
            params, opt_state, loss, accuracy = train_step(params, opt_state, frames, targets)
            if step == 0:
                first_loss = float(loss)
            if step % 50 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(accuracy):.3f}")
    metrics = {"steps": steps, "batch_size": batch_size, "lr": lr,
               "seconds": round(time.time() - start, 1), "first_loss": first_loss,
               "train_loss": float(loss)}
    metrics.update(_held_out_accuracy(probe, params, world_dir, num_frames, size))
    return params["vision"], metrics


def _held_out_accuracy(probe, params, world_dir: str, num_frames: int, size: int) -> dict:
    frames, targets = load_world_videos(world_dir, "eval_", num_frames, size, progress=False)
    evaluate = jax.jit(lambda p, f, t: probe_loss(probe.apply({"params": p}, f), t))
    loss, accuracy = evaluate(params, frames, targets)
    per_target = {name: round(float(a), 4)
                  for (name, _), a in zip(TARGETS + FRAME_TARGETS, accuracy)}
    return {"eval_loss": round(float(loss), 4), "eval_accuracy": per_target,
            "eval_mean_accuracy": round(float(np.mean(list(per_target.values()))), 4)}


def load_tower(cache_dir: str) -> dict:
    """The tower's params as `pretrained_tower` cached them (WORKDIR/data/vision_tower)."""
    reader = safetensors_io.SafetensorsReader(cache_dir)
    return traverse_util.unflatten_dict({key: reader.get(key) for key in reader.keys()}, sep="/")


def pretrained_tower(cache_dir: str, world_dir: str, config: ClipVisionConfig, num_frames: int,
                     steps: int, batch_size: int, lr: float, seed: int,
                     progress: bool = True) -> dict:
    """The tower's params from `cache_dir`, pre-training them there first if absent or if they
    were made with other settings. Written atomically: a crash leaves no half cache."""
    settings = {"vision": dataclasses.asdict(config), "num_frames": num_frames, "steps": steps,
                "batch_size": batch_size, "lr": lr, "seed": seed, "probe": PROBE_VERSION}
    settings = json.loads(json.dumps(settings, default=str))
    metrics_path = os.path.join(cache_dir, METRICS_FILE)
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            if json.load(f).get("settings") == settings:
                return load_tower(cache_dir)
    params, metrics = pretrain_vision(world_dir, config, num_frames, steps, batch_size, lr, seed,
                                      progress)
    tmp = cache_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    safetensors_io.write_safetensors(flat.items(), tmp)
    with open(os.path.join(tmp, METRICS_FILE), "w") as f:
        json.dump({"settings": settings, **metrics}, f, indent=1)
    shutil.rmtree(cache_dir, ignore_errors=True)
    os.replace(tmp, cache_dir)
    return params

