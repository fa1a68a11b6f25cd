"""FLOP accounting agrees with XLA's own count of the compiled programs (forward and train)."""

import jax
import jax.numpy as jnp
import optax
import pytest

from rlaif_jax.models import flops
from rlaif_jax.models.clip_vision import ClipVisionConfig
from rlaif_jax.models.llama import Llama, LlamaConfig
from rlaif_jax.models.video_llm import VideoLLM, VideoLLMConfig


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]


def tiny_llama(**changes) -> LlamaConfig:
    # Unscanned: XLA's cost analysis counts a while loop's body once, not once per trip.
    values = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=2,
                  num_heads=4, scan_layers=False)
    return LlamaConfig(**{**values, **changes})


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_forward_flops_match_xla_cost_analysis(kv_heads):
    config = tiny_llama(num_kv_heads=kv_heads)
    model = Llama(config)
    ids = jnp.zeros((2, 64), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]
    xla = xla_flops(lambda p, x: model.apply({"params": p}, x).logits, params, ids)
    ours = flops.llama_forward_flops(config, 2, 64)
    assert abs(xla - ours) / ours < 0.05, (xla, ours)


def test_train_step_flops_are_three_forwards():
    config = tiny_llama()
    model = Llama(config)
    ids = jnp.zeros((2, 64), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]

    def loss(p, x):
        logits = model.apply({"params": p}, x).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, x).mean()

    xla = xla_flops(jax.grad(loss), params, ids)
    ours = flops.llama_train_step_flops(config, 2, 64)
    # The loss's elementwise work over the vocabulary is counted by XLA, not by us.
    assert abs(xla - ours) / ours < 0.08, (xla, ours)
    # And the frozen-base (LoRA) count is clearly not what a full step costs.
    assert flops.llama_train_step_flops(config, 2, 64, training="lora") < 0.7 * xla


def tiny_video(projector_type="mlp2x_gelu") -> VideoLLMConfig:
    vision = ClipVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256,
                              num_layers=2, num_heads=4, scan_layers=False)
    return VideoLLMConfig(vision=vision, llm=tiny_llama(num_layers=1),
                          projector_type=projector_type,
                          num_frames=4, image_token_id=511)


def test_video_llm_forward_flops_match_xla_cost_analysis():
    config = tiny_video()
    model = VideoLLM(config)
    ids = jnp.zeros((2, 32), jnp.int32).at[:, 3].set(config.image_token_id)
    frames = jnp.zeros((2, 4, 32, 32, 3), jnp.uint8)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, None, frames)["params"]
    xla = xla_flops(lambda p, x, f: model.apply({"params": p}, x, frames=f).logits,
                    params, ids, frames)
    ours = flops.video_llm_forward_flops(config, 2, 32, 4)
    assert abs(xla - ours) / ours < 0.05, (xla, ours)
    # The vision tower is a real share of it: dropping it would miss the tolerance.
    assert flops.clip_forward_flops(config.vision, 8) > 0.05 * ours


def test_video_llm_train_step_flops_match_xla_cost_analysis():
    config = tiny_video()
    model = VideoLLM(config)
    ids = jnp.zeros((2, 32), jnp.int32).at[:, 3].set(config.image_token_id)
    frames = jnp.zeros((2, 4, 32, 32, 3), jnp.uint8)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, None, frames)["params"]
    trainable = {k: v for k, v in params.items() if k != "vision"}

    def loss(train, vision, x, f):
        logits = model.apply({"params": dict(train, vision=vision)}, x, frames=f).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, x).mean()

    xla = xla_flops(jax.grad(loss), trainable, params["vision"], ids, frames)
    ours = flops.video_llm_train_step_flops(config, 2, 32, 4)
    assert abs(xla - ours) / ours < 0.08, (xla, ours)


def test_peak_flops_by_device_kind():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert flops.peak_flops(Device("TPU v5 lite")) == 197e12
    assert flops.peak_flops(Device("TPU v5p")) == 459e12
    assert flops.peak_flops(Device("NVIDIA H100 80GB HBM3")) == 989e12
    assert flops.peak_flops(Device("cpu")) is None
    assert flops.mfu(1e12, 2.0, 1e12) == 0.5
