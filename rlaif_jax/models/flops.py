"""FLOP counts of the LLaMA, the CLIP tower and the video LLM, so any run can print MFU directly.

Counts matmul FLOPs only (2 per multiply-add), the standard for MFU: elementwise work, norms
and softmax are noise at these sizes. Attention's q.k and p.v are counted in full (the causal
half that is masked is still computed by XLA's dense attention).

A train step costs forward + backward. The backward of a matmul is two matmuls of the same size:
the gradient to its input (needed whenever anything below it trains) and the gradient to its
weight (needed only when that weight trains). So a fully trained stack costs 3x its forward;
a frozen stack under trained layers (LoRA: every base weight frozen) costs 2x; a frozen stack
with nothing trained below it (the CLIP tower) costs 1x. LoRA's own matmuls are not counted
(r << H: under 2% at r = 64, H = 4096).
"""

from __future__ import annotations

from rlaif_jax.models.llama import LlamaConfig
from rlaif_jax.models.projector import projector_depth
from rlaif_jax.models.video_llm import num_video_tokens

# Backward multipliers of a weight stack by how it trains (see the module docstring).
PASSES = {"full": 3.0, "lora": 2.0, "frozen": 1.0}


def _passes(training: str) -> float:
    if training not in PASSES:
        raise ValueError(f"training={training!r}: expected one of {sorted(PASSES)}")
    return PASSES[training]


def llama_forward_flops(config: LlamaConfig, batch: int, length: int,
                        with_logits: bool = True, logit_positions: int | None = None) -> float:
    """Forward FLOPs of `batch` rows of `length` tokens; the LM head runs on `logit_positions`
    positions a row (default: all of them)."""
    tokens = batch * length
    hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_heads, config.kv_heads,
                                         config.dim_per_head)
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o + k, v
    mlp = 3 * hidden * config.intermediate_size
    per_layer = 2 * tokens * (projections + mlp)
    # scores q.k and the weighted sum of v: each 2 * L^2 * head_dim per head, causal not discounted
    per_layer += 2 * 2 * batch * length * length * heads * head_dim
    flops = config.num_layers * per_layer
    if with_logits:
        positions = length if logit_positions is None else logit_positions
        flops += 2 * batch * positions * hidden * config.vocab_size
    return float(flops)


def llama_train_step_flops(config: LlamaConfig, batch: int, length: int,
                           training: str = "full") -> float:
    """Forward + backward of the LLaMA (and its LM head) with the cross-entropy loss."""
    return _passes(training) * llama_forward_flops(config, batch, length)


def clip_forward_flops(config, images: int, layers: int | None = None) -> float:
    """Forward FLOPs of the CLIP vision tower on `images` images through `layers` encoder
    layers; by default the layers up to the one whose output is read (`select_layer`): the
    useful work (a scanned tower also runs the layers after it, which MFU does not credit)."""
    layers = config.selected_index if layers is None else layers
    tokens = config.num_positions  # patches + CLS
    width = config.hidden_size
    patch = 2 * config.num_patches * config.patch_size ** 2 * config.num_channels * width
    per_layer = 2 * tokens * (4 * width * width + 2 * width * config.intermediate_size)
    per_layer += 2 * 2 * tokens * tokens * width  # q.k and p.v over all heads
    return float(images * (patch + layers * per_layer))


def projector_forward_flops(config, images: int) -> float:
    """Forward FLOPs of the projector on every frame's selected features."""
    tokens = images * config.vision.num_features
    hidden = config.llm.hidden_size
    depth = projector_depth(config.projector_type)
    return float(2 * tokens * (config.vision.hidden_size * hidden + (depth - 1) * hidden * hidden))


def video_llm_forward_flops(config, batch: int, length: int, num_frames: int,
                            with_logits: bool = True) -> float:
    """Forward FLOPs of the video LLM on `batch` rows of `length` text tokens, each with a video
    of `num_frames` frames: CLIP on every frame, the projector, then the LLaMA over the expanded
    sequence (length + N - 1), with the LM head on the `length` text positions only."""
    expanded = length + num_video_tokens(config, num_frames) - 1
    images = batch * num_frames
    return (clip_forward_flops(config.vision, images) + projector_forward_flops(config, images)
            + llama_forward_flops(config.llm, batch, expanded, with_logits=with_logits,
                                  logit_positions=length))


def video_llm_train_step_flops(config, batch: int, length: int, num_frames: int,
                               llm_training: str = "full", projector_training: str = "full"
                               ) -> float:
    """Forward + backward of the video LLM with the CLIP tower frozen (docs/method.md): CLIP costs its
    forward only; the projector, with nothing trained below it, needs no input gradient (2x
    when trained, 1x when frozen); the LLaMA as `llama_train_step_flops`."""
    images = batch * num_frames
    projector = projector_forward_flops(config, images) * (
        2.0 if projector_training == "full" else 1.0)
    expanded = length + num_video_tokens(config, num_frames) - 1
    llm = _passes(llm_training) * llama_forward_flops(config.llm, batch, expanded,
                                                      logit_positions=length)
    return clip_forward_flops(config.vision, images) + projector + llm


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the chips' peak FLOP/s."""
    return flops_per_step / step_seconds / peak_flops


# Dense bf16 peak FLOP/s of one chip (vendors' data sheets), for MFU on accelerators: the
# first entry whose text is in the device's `device_kind` wins (so "TPU v5 lite" before "TPU v5").
PEAK_BF16_FLOPS = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5", 459e12),  # v5p
    ("TPU v6 lite", 918e12),  # v6e
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of a jax device from its `device_kind`, None when unknown (e.g. CPU)."""
    kind = getattr(device, "device_kind", "")
    for name, value in PEAK_BF16_FLOPS:
        if name in kind:
            return value
    return None
