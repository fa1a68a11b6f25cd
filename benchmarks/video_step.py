"""Video LLM train step (forward, backward, AdamW) with 8 frames: ours vs the same composition in
PyTorch (`CLIPVisionModel` -> mlp2x_gelu projector -> spatio-temporal pooling -> spliced into
`LlamaForCausalLM`'s input embeddings).

Both sides: CLIP frozen (forward only, second-to-last layer's patch features), projector and
LLaMA trained with AdamW, next-token cross entropy on the text positions, float32, the same
dims and batch, runs alternated. Weights are random on each side (only time is compared here;
tests/models/test_video_llm.py checks our outputs against transformers' LLaVA).

    python -m benchmarks.video_step [--frames 8 --image 224 --patch 16 --vision_width 256 ...]
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from benchmarks.common import (add_llama_dims, add_train_step_layout, alternate,
                               fastest_torch_threads, machine, matmul_ceiling_flops)
from benchmarks.profile import jax_breakdown, rounded, torch_breakdown
from benchmarks.train_step import Stepper, adamw_step, next_token_loss
from rlaif_jax.models.clip_vision import ClipVisionConfig
from rlaif_jax.models.flops import video_llm_train_step_flops
from rlaif_jax.models.llama import LlamaConfig
from rlaif_jax.models.video_llm import VideoLLM, VideoLLMConfig
from rlaif_jax.sft.loss import IGNORE_INDEX


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--vision_width", type=int, default=256)
    p.add_argument("--vision_layers", type=int, default=4)
    p.add_argument("--vision_heads", type=int, default=4)
    add_llama_dims(p, runs=5)
    p.add_argument("--length", type=int, default=128, help="text tokens a row")
    p.add_argument("--batch", type=int, default=2)
    add_train_step_layout(p)  # the LLaMA's attention blocks; both towers' layer layout
    p.add_argument("--profile", action="store_true")
    return p


def configs(args) -> VideoLLMConfig:
    vision = ClipVisionConfig(image_size=args.image, patch_size=args.patch,
                              hidden_size=args.vision_width,
                              intermediate_size=4 * args.vision_width,
                              num_layers=args.vision_layers, num_heads=args.vision_heads,
                              scan_layers=bool(args.scan_layers))
    llm = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
                      num_layers=args.layers, num_heads=args.heads,
                      attention_block=args.attention_block,
                      scan_layers=bool(args.scan_layers))
    return VideoLLMConfig(vision=vision, llm=llm, num_frames=args.frames,
                          image_token_id=args.vocab)


def inputs(args, config: VideoLLMConfig):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, args.vocab, (args.batch, args.length), dtype=np.int32)
    ids[:, 4] = config.image_token_id  # after a short system prefix
    frames = rng.integers(0, 256, (args.batch, args.frames, args.image, args.image, 3),
                          dtype=np.uint8)
    return ids, frames


def make_ours(config: VideoLLMConfig, ids, frames) -> Stepper:
    model = VideoLLM(config)
    ids, frames = jnp.asarray(ids), jnp.asarray(frames)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ids[:1], None, frames[:1])["params"]
    params = nn.unbox(jax.tree.map(lambda x: x, params))  # plain dict
    vision = params.pop("vision")

    # The placeholder is no target (the SFT data's convention; torch's side predicts id 0).
    labels = jnp.where(ids == config.image_token_id, IGNORE_INDEX, ids)

    def loss_fn(trained, batch):
        ids, frames, vision = batch
        return next_token_loss(model, {"params": dict(trained, vision=vision)}, ids, labels,
                               frames)

    optimizer = optax.adamw(1e-4)
    return Stepper(adamw_step(loss_fn, optimizer), params, optimizer, (ids, frames, vision))


class TorchVideoLLM(torch.nn.Module):
    """CLIPVisionModel + LLaVA's mlp2x_gelu projector + LlamaForCausalLM, spliced as ours."""

    def __init__(self, config: VideoLLMConfig):
        super().__init__()
        v, llm = config.vision, config.llm
        self.vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
            image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
            attn_implementation="sdpa")).eval().requires_grad_(False)
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(v.hidden_size, llm.hidden_size), torch.nn.GELU(),
            torch.nn.Linear(llm.hidden_size, llm.hidden_size))
        hf = transformers.LlamaConfig(
            vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
            intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
            num_attention_heads=llm.num_heads, max_position_embeddings=4096,
            attn_implementation="sdpa")
        self.llm = transformers.LlamaForCausalLM(hf).train()
        self.select_layer = v.select_layer

    def forward(self, ids, pixels, placeholder: int):
        batch, frames = pixels.shape[:2]
        with torch.no_grad():
            features = self.vision(pixels.flatten(0, 1), output_hidden_states=True
                                   ).hidden_states[self.select_layer][:, 1:]
        tokens = self.projector(features).unflatten(0, (batch, frames))  # [B, T, P, H]
        video = torch.cat([tokens.mean(2), tokens.mean(1)], dim=1)  # T temporal + P spatial
        text = self.llm.model.embed_tokens(ids)
        embeds = torch.cat([text[:, :placeholder], video, text[:, placeholder + 1:]], dim=1)
        hidden = self.llm.model(inputs_embeds=embeds).last_hidden_state
        n = video.shape[1]
        # Back to the text positions (the placeholder's output is read at the last video token).
        hidden = torch.cat([hidden[:, :placeholder], hidden[:, placeholder + n - 1:]], dim=1)
        return self.llm.lm_head(hidden)


def make_theirs(config: VideoLLMConfig, ids, frames):
    torch.manual_seed(0)
    model = TorchVideoLLM(config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    v = config.vision
    pixels = (torch.as_tensor(frames).float() / 255.0 - torch.tensor(v.image_mean)) / torch.tensor(
        v.image_std)
    pixels = pixels.permute(0, 1, 4, 2, 3).contiguous()  # [B, T, 3, H, W]
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    placeholder = int(np.argmax(ids[0] == config.image_token_id))
    ids_t = torch.where(ids_t == config.image_token_id, 0, ids_t)

    def run():
        optimizer.zero_grad(set_to_none=True)
        logits = model(ids_t, pixels, placeholder)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids_t[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()

    return run


def main(argv=None):
    args = parser().parse_args(argv)
    config = configs(args)
    ids, frames = inputs(args, config)
    ours, theirs = make_ours(config, ids, frames), make_theirs(config, ids, frames)
    probe = fastest_torch_threads(theirs)  # torch's faster thread count (common.py says why)
    times = alternate({"ours": ours, "theirs": theirs}, args.runs)
    flops = video_llm_train_step_flops(config, args.batch, args.length, args.frames)
    ceiling = matmul_ceiling_flops()
    ours_s, theirs_s = times["ours"]["wall_s"], times["theirs"]["wall_s"]
    print(json.dumps({
        "name": "video_llm_train_step", "dims": vars(args), **machine(),
        "torch_thread_probe_s": probe,
        "video_tokens": config.num_video_tokens,
        "ours_s": round(ours_s, 4), "theirs_s": round(theirs_s, 4),
        "ratio_ours_over_theirs": round(ours_s / theirs_s, 3),
        "cpu_ratio_ours_over_theirs": round(times["ours"]["cpu_s"] / times["theirs"]["cpu_s"], 3),
        "ours_wall_all_s": times["ours"]["wall_all_s"],
        "theirs_wall_all_s": times["theirs"]["wall_all_s"],
        "flops_per_step": flops, "matmul_ceiling_flops": round(ceiling),
        "ours_share_of_ceiling": round(flops / ours_s / ceiling, 3),
        "theirs_share_of_ceiling": round(flops / theirs_s / ceiling, 3),
    }), flush=True)
    if args.profile:
        print(json.dumps({
            "name": "video_llm_train_step_profile", "dims": vars(args),
            "ours_s_by_part": rounded(jax_breakdown(ours.compiled, ours)),
            "theirs_s_by_op": rounded(torch_breakdown(theirs, args.vocab)),
        }), flush=True)


if __name__ == "__main__":
    main()
