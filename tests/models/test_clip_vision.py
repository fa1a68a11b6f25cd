"""CLIP vision tower: float32 parity with transformers' CLIPVisionModel, converters, presets."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import rlaif_jax
from configs import models
from rlaif_jax.checkpoints.hf import abstract_params, clip_vision_config_to_hf
from rlaif_jax.models.clip_vision import ClipVision, ClipVisionConfig, normalize_images
from tests.support import (assert_close_scaled, clip_pixel_values, random_frames, save_tiny_hf_clip_vision, tiny_hf_clip_vision_config)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("clip"))
    return directory, save_tiny_hf_clip_vision(directory)


@pytest.fixture(scope="module")
def images():
    return random_frames((3, 32, 32, 3), seed=1)


@pytest.fixture(scope="module")
def hf_outputs(hf_clip, images):
    with torch.no_grad():
        return hf_clip[1](clip_pixel_values(images), output_hidden_states=True)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_hidden_state_matches_transformers(hf_clip, images, hf_outputs, scan_layers):
    model, params = rlaif_jax.from_pretrained(hf_clip[0], scan_layers=scan_layers)
    assert isinstance(model, ClipVision)
    out = ClipVision(model.config, output_hidden_states=True).apply({"params": params}, images)
    assert len(out.hidden_states) == len(hf_outputs.hidden_states) == 4
    for ours, ref in zip(out.hidden_states, hf_outputs.hidden_states):
        assert_close_scaled(ours, ref.numpy())
    assert_close_scaled(out.last_hidden_state, hf_outputs.last_hidden_state.numpy())
    assert_close_scaled(out.pooler_output, hf_outputs.pooler_output.numpy())


@pytest.mark.parametrize("select_layer,select_feature", [(-2, "patch"), (-1, "cls_patch"),
                                                         (0, "patch"), (1, "cls_patch")])
def test_selected_features_are_llava_s(hf_clip, images, hf_outputs, select_layer, select_feature):
    model, params = rlaif_jax.from_pretrained(
        hf_clip[0], select_layer=select_layer, select_feature=select_feature)
    features = model.apply({"params": params}, images).features
    ref = hf_outputs.hidden_states[select_layer].numpy()
    if select_feature == "patch":
        ref = ref[:, 1:]
    assert features.shape == ref.shape == (3, 16 + (select_feature == "cls_patch"), 48)
    assert_close_scaled(features, ref)


def test_normalisation_on_device_equals_clip_processor(images):
    config = ClipVisionConfig(image_size=32, patch_size=8, hidden_size=48, num_heads=4)
    ours = normalize_images(jnp.asarray(images), config)
    ref = clip_pixel_values(images).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_wrong_frame_size_fails_clearly(hf_clip):
    model, params = rlaif_jax.from_pretrained(hf_clip[0])
    with pytest.raises(ValueError, match=r"expects images \[N, 32, 32, 3\].*got \(2, 64, 64, 3\)"):
        model.apply({"params": params}, np.zeros((2, 64, 64, 3), np.uint8))


def test_vision_half_of_a_clip_model_loads(tmp_path, images):
    torch.manual_seed(3)
    config = transformers.CLIPConfig(
        vision_config=tiny_hf_clip_vision_config().to_dict(),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, vocab_size=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        projection_dim=16)
    config._attn_implementation = "eager"
    clip = transformers.CLIPModel(config).eval()
    clip.save_pretrained(str(tmp_path))
    model, params = rlaif_jax.from_pretrained(str(tmp_path))
    assert isinstance(model, ClipVision)
    out = ClipVision(model.config, output_hidden_states=True).apply({"params": params}, images)
    with torch.no_grad():
        ref = clip.vision_model(clip_pixel_values(images), output_hidden_states=True)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert_close_scaled(ours, theirs.numpy())


def test_hub_key_layout_loads_the_same_params(hf_clip, tmp_path):
    """Hub checkpoints prefix CLIPVisionModel keys with `vision_model.`; transformers 5 does not."""
    tensors = load_file(os.path.join(hf_clip[0], "model.safetensors"))
    assert not any(k.startswith("vision_model.") for k in tensors)
    save_file({f"vision_model.{k}": v for k, v in tensors.items()},
              str(tmp_path / "model.safetensors"))
    with open(os.path.join(hf_clip[0], "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    _, params = rlaif_jax.from_pretrained(hf_clip[0])
    _, params2 = rlaif_jax.from_pretrained(str(tmp_path))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


def test_export_round_trips_through_transformers(hf_clip, images, tmp_path):
    model, params = rlaif_jax.from_pretrained(hf_clip[0])
    params = jax.tree.map(lambda p: p * 1.01 + 0.001, params)  # ours, not the files we read
    rlaif_jax.save_pretrained(model, params, str(tmp_path))
    reloaded = transformers.CLIPVisionModel.from_pretrained(
        str(tmp_path), attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = reloaded(clip_pixel_values(images), output_hidden_states=True)
    out = ClipVision(model.config, output_hidden_states=True).apply({"params": params}, images)
    assert_close_scaled(out.hidden_states[-2], ref.hidden_states[-2].numpy())
    assert_close_scaled(out.pooler_output, ref.pooler_output.numpy())


def test_clip_l14_336_parameter_count_matches_transformers():
    config = ClipVisionConfig.from_dict(models.get_config("clip_vit_l14_336"))
    assert (config.num_patches, config.hidden_size, config.num_layers) == (576, 1024, 24)
    size = config.image_size
    abstract = abstract_params(ClipVision(config), jnp.zeros((1, size, size, 3), jnp.uint8))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    hf_config = transformers.CLIPVisionConfig(**clip_vision_config_to_hf(config))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.CLIPVisionModel(hf_config).parameters())
    assert ours == theirs
    assert abs(ours / 1e6 - 303.5) < 1.0  # CLIP ViT-L/14-336's vision tower


def test_tiny_preset_builds_and_runs():
    config = ClipVisionConfig.from_dict(models.get_config("clip_tiny"))
    model = ClipVision(config)
    frames = random_frames((2, config.image_size, config.image_size, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), frames)
    out = jax.jit(model.apply)(variables, frames)
    assert out.features.shape == (2, config.num_patches, config.hidden_size)
    assert np.all(np.isfinite(out.features))


def test_bf16_compute_stays_close_to_fp32(hf_clip, images, hf_outputs):
    model, params = rlaif_jax.from_pretrained(hf_clip[0], dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # fp32 master weights
    features = jax.jit(model.apply)({"params": params}, images).features
    assert features.dtype == jnp.bfloat16
    ref = hf_outputs.hidden_states[-2][:, 1:].numpy()
    err = np.max(np.abs(np.asarray(features, np.float32) - ref))
    assert err < 0.05 * np.max(np.abs(ref)), err
