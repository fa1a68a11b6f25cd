"""Does the tiny video LLM use the video? A fast proxy without generation (the "video gap").

Trains `video_tiny` on the short-answer split of a synthetic-world SFT build (rows of videos
with build index < --split), then reports on the held-out videos (index >= --split) the
teacher-forced answer exact match and NLL with each row's own video and with another held-out
video (rows rolled by 7), the norm of the pooled video tokens and their spread across videos
(mean distance to the batch mean / mean norm), and exact match per question type.

    python -m benchmarks.video_gap steps=100 every=50 data=/tmp/w/tiny/data [lr=3e-3]
        [vis_mult=1.0 (lr factor for vision + projector; 0 freezes both)]
        [patch=16] [wd=0.0] [split=310] [bs=32] [seed=0] [warm=0.05]
        [vision=DIR (a pre-trained tower: WORKDIR/data/vision_tower) proj_mult=X]
        [width=N layers=N (the LLM's size)]
        [only=Which_way (train on one question type only: its first two words, _ for space)]

`data` is a workdir's data/ folder made by `python launch/main.py --config=configs/sft.py`.
"""

import sys, time, collections
import numpy as np
import jax, jax.numpy as jnp, optax
import flax.linen as nn
from transformers import AutoTokenizer

from configs import models
from rlaif_jax.data.pipeline import Pipeline
from rlaif_jax.engine.model_init import video_llm_config
from rlaif_jax.sft.loss import token_cross_entropy
from rlaif_jax.models.video_llm import VideoLLM

def main(argv):
    args = dict(steps=150, lr=3e-3, vis_mult=1.0, every=25, patch=16, wd=0.0, seed=0,
                bs=32, data="/tmp/w5/tiny/data", split=310, warm=0.05,
                vision="", proj_mult=-1.0, width=0, layers=0, only="")
    for a in argv:
        k, v = a.split("=")
        args[k] = type(args[k])(v)
    print(args, flush=True)

    tok = AutoTokenizer.from_pretrained(f"{args['data']}/world/tokenizer")
    pipe = Pipeline(f"{args['data']}/sft", "short", tok, 256, 64, shuffle=False)
    rows = collections.defaultdict(list)
    for step in range(pipe.steps_per_epoch):
        b = pipe.batch(step)
        for k in ("input_ids", "attention_mask", "labels", "frames", "index", "valid"):
            rows[k].append(b[k])
    rows = {k: np.concatenate(v) for k, v in rows.items()}
    valid = rows.pop("valid")
    rows = {k: v[valid] for k, v in rows.items()}
    recs = [pipe.record(i) for i in rows["index"]]
    video = np.array([int(r["video"]) for r in recs])
    qtext = [r["values"][0] for r in recs]
    print("video ids", video.min(), video.max(), "rows", len(video), flush=True)
    held = video >= args["split"]
    train = {k: v[~held] for k, v in rows.items()}
    test = {k: v[held] for k, v in rows.items()}
    qtypes = np.array([" ".join(q.split()[1:3]) for q in qtext])
    if args["only"]:  # held-out rows stay all types: the others show what is forgotten
        chosen = ~held & (qtypes == args["only"].replace("_", " "))
        if not chosen.any():
            raise SystemExit(f"only={args['only']}: no training rows of that type; the types "
                             f"are {sorted(set(qtypes))}")
        train = {k: v[chosen] for k, v in rows.items()}
    qtype = qtypes[held]
    print("train rows", len(train["index"]), "held-out rows", len(test["index"]), flush=True)

    mc = models.get_config("video_tiny")
    mc.freeze_vision = False
    mc.vision.patch_size = args["patch"]
    if args["width"]:  # a wider LLM (intermediate size scaled alike)
        mc.llm.intermediate_size = mc.llm.intermediate_size * args["width"] // mc.llm.hidden_size
        mc.llm.hidden_size = args["width"]
    if args["layers"]:
        mc.llm.num_layers = args["layers"]
    cfg = video_llm_config(mc, tok)
    model = VideoLLM(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(args["seed"]), jnp.zeros((1, 8), jnp.int32)))["params"]
    if args["vision"]:  # the SFT stage's cached pre-trained tower
        from rlaif_jax.sft.vision_pretrain import load_tower
        params["vision"] = jax.tree.map(jnp.asarray, load_tower(args["vision"]))

    sched = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, int(args["warm"] * args["steps"])),
                                               args["steps"])
    def opt(mult):
        return optax.adamw(lambda s: args["lr"] * mult * sched(s), weight_decay=args["wd"])
    proj_mult = args["vis_mult"] if args["proj_mult"] < 0 else args["proj_mult"]
    labels = {k: {"vision": "vis", "projector": "proj"}.get(k, "llm") for k in params}
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.multi_transform({"vis": opt(args["vis_mult"]), "proj": opt(proj_mult),
                                            "llm": opt(1.0)}, labels))
    state = tx.init(params)

    def batch_of(d, idx, frames=None):
        b = {k: jnp.asarray(d[k][idx]) for k in ("input_ids", "attention_mask", "labels")}
        b["frames"] = jnp.asarray(d["frames"][idx] if frames is None else frames)
        return b

    def loss_fn(p, b):
        out = model.apply({"params": p}, b["input_ids"], b["attention_mask"], frames=b["frames"])
        s = token_cross_entropy(out.logits, b["labels"])
        return s["loss"] / s["weight"], s

    @jax.jit
    def train_step(p, st, b):
        (l, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), st, l

    @jax.jit
    def eval_rows(p, b):
        out = model.apply({"params": p}, b["input_ids"], b["attention_mask"], frames=b["frames"])
        logits = out.logits[:, :-1]
        t = b["labels"][:, 1:]
        m = t != -100
        hits = (jnp.argmax(logits, -1) == jnp.where(m, t, 0)) | ~m
        logz = jax.nn.logsumexp(logits, -1)
        nll = (logz - jnp.take_along_axis(logits, jnp.where(m, t, 0)[..., None], -1)[..., 0]) * m
        return jnp.all(hits, -1), nll.sum(-1) / m.sum(-1)

    @jax.jit
    def tokens_of(p, frames):
        return model.apply({"params": p}, frames, method=VideoLLM.encode_video)

    n_test = len(test["index"])
    perm = np.roll(np.arange(n_test), 7)  # another held-out video for each row
    perm_frames = test["frames"][perm]

    def evaluate(p):
        ex, nl, exb, nlb = [], [], [], []
        for s in range(0, n_test, 64):
            idx = np.arange(s, min(s + 64, n_test))
            e, n = eval_rows(p, batch_of(test, idx)); ex.append(e); nl.append(n)
            e, n = eval_rows(p, batch_of(test, idx, perm_frames[idx])); exb.append(e); nlb.append(n)
        ex, nl, exb, nlb = map(lambda x: np.concatenate([np.asarray(a) for a in x]), (ex, nl, exb, nlb))
        vt = np.asarray(tokens_of(p, jnp.asarray(test["frames"][:32])))
        norm = np.linalg.norm(vt, axis=-1).mean()
        spread = np.linalg.norm(vt - vt.mean(0), axis=-1).mean() / norm
        per = {q: f"{ex[qtype == q].mean():.2f}/{exb[qtype == q].mean():.2f}"
               for q in ("What colour", "Which way", "How many", "Which shape")}
        return (f"exact {ex.mean():.3f} blind {exb.mean():.3f} | nll {nl.mean():.3f} blind "
                f"{nlb.mean():.3f} | tok norm {norm:.2f} spread {spread:.3f} | {per}")

    print("step 0", evaluate(params), flush=True)
    rng = np.random.default_rng(args["seed"])
    n_train = len(train["index"])
    t0 = time.time()
    for step in range(1, args["steps"] + 1):
        idx = rng.choice(n_train, args["bs"], replace=False)
        params, state, l = train_step(params, state, batch_of(train, idx))
        if step % args["every"] == 0 or step == args["steps"]:
            print(f"step {step} loss {float(l):.3f} t {time.time() - t0:.0f}s", evaluate(params),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
