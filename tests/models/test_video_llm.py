"""Video LLM: LLaVA parity with transformers, pooling, splicing with static shapes, heads,
LLaVA checkpoint layouts both ways, host-side batch validation, presets."""

import json
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
from rlaif_jax.checkpoints.hf import abstract_params, video_llm_config_to_llava_hf
from rlaif_jax.models.clip_vision import ClipVision
from rlaif_jax.models.llama import Llama
from rlaif_jax.models.projector import Projector
from rlaif_jax.models.video_llm import (BatchError, VideoLLM, VideoLLMConfig,
                                        map_reference_image_token, pool_video_tokens,
                                        validate_batch)
from tests.support import (TINY_LLAVA_VISION, assert_close_scaled, clip_pixel_values, random_frames, save_tiny_hf_llava)

IMAGE_ID = 96  # inside the tiny vocabulary (97), as llava-hf adds <image> to its tokenizer
PATCHES = 16  # 32 px images, 8 px patches


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("llava"))
    return directory, save_tiny_hf_llava(directory, image_token_index=IMAGE_ID)


@pytest.fixture(scope="module")
def image_model(hf_llava):
    """LLaVA semantics: one image, every patch token (pooling none)."""
    return rlaif_jax.from_pretrained(hf_llava[0], pooling="none", num_frames=1)


@pytest.fixture(scope="module")
def video_model(hf_llava):
    return rlaif_jax.from_pretrained(hf_llava[0], pooling="spatiotemporal", num_frames=3)


def jit_apply(model):
    return jax.jit(model.apply, static_argnames=("return_expanded", "compute_logits", "method"))


def expand_like_transformers(ids, mask, n, image_id):
    """What transformers' Llava needs: the placeholder repeated n times (n - 1 front pads for a
    row without one); also returns each original token's index in the expanded row."""
    out_ids, out_mask, where = [], [], []
    for row, row_mask in zip(ids, mask):
        row, row_mask = list(row), list(row_mask)
        if image_id in row:
            p = row.index(image_id)
            out_ids.append(row[:p] + [image_id] * n + row[p + 1:])
            out_mask.append(row_mask[:p] + [1] * n + row_mask[p + 1:])
            where.append([t if t < p else t + n - 1 for t in range(len(row))])
        else:
            out_ids.append([0] * (n - 1) + row)
            out_mask.append([0] * (n - 1) + row_mask)
            where.append([t + n - 1 for t in range(len(row))])
    return np.array(out_ids), np.array(out_mask), np.array(where)


def hf_llava_logits(model, ids, mask, images):
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                     position_ids=torch.as_tensor(positions),
                     pixel_values=clip_pixel_values(images)).logits.numpy()


# Two left-padded prompts, the placeholder at different places.
IDS = np.array([[0, 0, 5, 6, IMAGE_ID, 7, 8, 9],
                [3, IMAGE_ID, 10, 11, 12, 13, 14, 15]], np.int32)
MASK = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], np.int32)


def test_one_image_logits_match_transformers_llava(hf_llava, image_model):
    model, params = image_model
    assert isinstance(model, VideoLLM) and model.config.image_token_id == IMAGE_ID
    frames = random_frames((2, 1, 32, 32, 3), seed=4)
    out = jit_apply(model)({"params": params}, IDS, MASK, frames=frames, return_expanded=True)
    ids, mask, where = expand_like_transformers(IDS, MASK, PATCHES, IMAGE_ID)
    ref = hf_llava_logits(hf_llava[1], ids, mask, frames[:, 0])
    np.testing.assert_array_equal(out.expanded_attention_mask, mask)
    np.testing.assert_array_equal(out.text_positions, where)
    assert_close_scaled(out.expanded_logits, ref, mask)
    # Aligned with input_ids: the placeholder's logit is the one read at the last video token.
    assert out.logits.shape == (2, 8, 97)
    assert_close_scaled(out.logits, np.take_along_axis(ref, where[..., None], axis=1), MASK)


def _rewrite(src, dst, rename, config_edit=None):
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    renamed = {}
    for key, value in tensors.items():
        new = rename(key)
        if new is not None:
            renamed[new] = value
    save_file(renamed, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config_edit:
        config = config_edit(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def _swap_prefix(key, table):
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return key


NEW_LAYOUT = [("language_model.model.", "model.language_model."),
              ("language_model.lm_head.", "lm_head."),
              ("vision_tower.", "model.vision_tower."),
              ("multi_modal_projector.", "model.multi_modal_projector.")]
HUB_OLD_LAYOUT = [("vision_tower.", "vision_tower.vision_model.")]
ORIGINAL_LAYOUT = [("language_model.model.", "model."),
                   ("language_model.lm_head.", "lm_head."),
                   ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
                   ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                   ("multi_modal_projector.linear_2.", "model.mm_projector.2.")]


def _original_config(hf_config, vision_tower):
    config = dict(hf_config["text_config"])
    config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava",
                  mm_projector_type="mlp2x_gelu", mm_hidden_size=TINY_LLAVA_VISION["hidden_size"],
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  mm_vision_tower=vision_tower, mm_use_im_start_end=False)
    return config


def _assert_same_params(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert len(flat_a) == len(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(leaf, flat_b[path], err_msg=jax.tree_util.keystr(path))


def test_both_transformers_key_layouts_load_the_same_params(hf_llava, image_model, tmp_path):
    _, params = image_model
    new = _rewrite(hf_llava[0], str(tmp_path / "new"), lambda k: _swap_prefix(k, NEW_LAYOUT))
    hub = _rewrite(hf_llava[0], str(tmp_path / "hub"), lambda k: _swap_prefix(k, HUB_OLD_LAYOUT))
    for directory in (new, hub):
        _assert_same_params(params, rlaif_jax.from_pretrained(directory)[1])


def test_original_llava_checkpoint_gives_the_same_logits(hf_llava, image_model, tmp_path):
    """LLaVA's own layout: LlamaForCausalLM keys + model.mm_projector.{0,2} + the vision tower
    under model.vision_tower.vision_tower (its shapes read off the tensors), `mm_*` config keys;
    its placeholder is an id past the vocabulary (the reference's -200, remapped)."""
    directory = _rewrite(hf_llava[0], str(tmp_path / "orig"),
                         lambda k: _swap_prefix(k, ORIGINAL_LAYOUT),
                         lambda c: _original_config(c, "openai/clip-vit-large-patch14-336"))
    model, params = rlaif_jax.from_pretrained(directory, pooling="none", num_frames=1)
    assert model.config.projector_type == "mlp2x_gelu"
    assert model.config.vision.num_heads == 2 and model.config.vision.num_layers == 2
    assert model.config.image_token_id == 97  # the first id past the vocabulary
    _assert_same_params(image_model[1], params)

    frames = random_frames((2, 1, 32, 32, 3), seed=5)
    ids = map_reference_image_token(np.where(IDS == IMAGE_ID, -200, IDS), 97)
    ours = jit_apply(model)({"params": params}, ids, MASK, frames=frames).logits
    ref_model, ref_params = image_model
    ref = jit_apply(ref_model)({"params": ref_params}, IDS, MASK, frames=frames).logits
    np.testing.assert_array_equal(ours, ref)


def test_original_llava_without_vision_tensors_reads_the_tower_directory(hf_llava, image_model,
                                                                         tmp_path):
    tower = str(tmp_path / "clip")
    hf_llava[1].model.vision_tower.save_pretrained(tower)
    directory = _rewrite(
        hf_llava[0], str(tmp_path / "orig"),
        lambda k: None if k.startswith("vision_tower.") else _swap_prefix(k, ORIGINAL_LAYOUT),
        lambda c: _original_config(c, tower))
    _, params = rlaif_jax.from_pretrained(directory)
    _assert_same_params(image_model[1], params)
    missing = _rewrite(directory, str(tmp_path / "orig2"), lambda k: k,
                       lambda c: dict(c, mm_vision_tower="openai/clip-vit-large-patch14-336"))
    with pytest.raises(rlaif_jax.checkpoints.hf.CheckpointError, match="vision_tower="):
        rlaif_jax.from_pretrained(missing)


def test_export_loads_in_transformers_and_back(image_model, tmp_path):
    model, params = image_model
    params = jax.tree.map(lambda p: p * 1.01 + 0.001, params)  # ours, not the files we read
    rlaif_jax.save_pretrained(model, params, str(tmp_path / "hf"))
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(
        str(tmp_path / "hf"), attn_implementation="eager", dtype=torch.float32).eval()
    frames = random_frames((2, 1, 32, 32, 3), seed=6)
    out = jit_apply(model)({"params": params}, IDS, MASK, frames=frames, return_expanded=True)
    ids, mask, _ = expand_like_transformers(IDS, MASK, PATCHES, IMAGE_ID)
    assert_close_scaled(out.expanded_logits, hf_llava_logits(reloaded, ids, mask, frames[:, 0]),
                        mask)

    # The original layout round-trips through our reader, video settings included.
    video = model.clone(config=model.config.replace(pooling="spatiotemporal", num_frames=7))
    rlaif_jax.save_pretrained(video, params, str(tmp_path / "orig"), layout="original")
    reloaded_model, reloaded_params = rlaif_jax.from_pretrained(str(tmp_path / "orig"))
    assert reloaded_model.config == video.config
    _assert_same_params(params, reloaded_params)


def test_spatiotemporal_pooling_matches_numpy_formula():
    features = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    ours = np.asarray(pool_video_tokens(jnp.asarray(features), "spatiotemporal"))
    temporal = features.mean(axis=2)  # [B, T, H]: frame t averaged over its patches
    spatial = features.mean(axis=1)  # [B, P, H]: patch p averaged over the frames
    np.testing.assert_allclose(ours, np.concatenate([temporal, spatial], axis=1), rtol=1e-6)
    assert pool_video_tokens(jnp.asarray(features), "none").shape == (2, 35, 3)


def test_encode_video_is_clip_then_projector_then_pooling(video_model):
    model, params = video_model
    frames = random_frames((2, 3, 32, 32, 3), seed=7)
    tokens = jit_apply(model)({"params": params}, frames, method=VideoLLM.encode_video)
    assert tokens.shape == (2, 3 + PATCHES, 64)
    per_frame = jax.jit(ClipVision(model.config.vision).apply)(
        {"params": params["vision"]}, frames.reshape(6, 32, 32, 3)).features
    projected = Projector("mlp2x_gelu", 64).apply({"params": params["projector"]}, per_frame)
    projected = np.asarray(projected).reshape(2, 3, PATCHES, 64)
    expected = np.concatenate([projected.mean(axis=2), projected.mean(axis=1)], axis=1)
    np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-6)


def test_mixed_batch_rows_get_the_logits_they_get_alone(video_model):
    model, params = video_model
    apply = jit_apply(model)
    ids = np.array([[0, 0, 4, IMAGE_ID, 5, 6, 7],    # video, left-padded prompt
                    [0, 0, 0, 8, 9, 10, 11],          # text only, left-padded
                    [3, IMAGE_ID, 12, 13, 2, 0, 0],   # video, right-padded (training)
                    [3, 14, 15, 16, 2, 0, 0]], np.int32)  # text only, right-padded
    mask = (ids != 0).astype(np.int32)
    has_video = np.array([True, False, True, False])
    frames = random_frames((4, 3, 32, 32, 3), seed=8)
    frames[~has_video] = 0
    batch = dict(input_ids=ids, attention_mask=mask, frames=frames, has_video=has_video)
    validate_batch(batch, model.config)
    # Video tokens computed once and reused (the rows alone below start from the frames).
    tokens = apply({"params": params}, frames, method=VideoLLM.encode_video)
    together = apply({"params": params}, ids, mask, has_video=has_video, video_tokens=tokens,
                     return_expanded=True)
    n = 3 + PATCHES
    # Text-only rows keep their pads at the front of the expanded sequence.
    assert not together.expanded_attention_mask[1, :n - 1 + 3].any()
    assert together.expanded_attention_mask[3, :n - 1].sum() == 0
    llm_apply = jax.jit(Llama(model.config.llm).apply)
    for row in range(4):
        alone = apply({"params": params}, ids[row:row + 1], mask[row:row + 1],
                      frames=frames[row:row + 1], has_video=has_video[row:row + 1])
        keep = mask[row].astype(bool)
        np.testing.assert_allclose(together.logits[row][keep], alone.logits[0][keep],
                                   rtol=1e-5, atol=1e-5)
        if not has_video[row]:  # and exactly what the LLM alone gives on the text
            llm = llm_apply({"params": params["llm"]}, ids[row:row + 1],
                            attention_mask=mask[row:row + 1]).logits
            np.testing.assert_allclose(alone.logits[0][keep], llm[0][keep], rtol=1e-5, atol=1e-5)

    # The sampler's path: prepare_inputs, then the LLM on the expanded sequence.
    embeds, emask, positions = apply({"params": params}, ids, mask, tokens, has_video,
                                     method=VideoLLM.prepare_inputs)
    assert embeds.shape == (4, 7 + n - 1, 64)
    np.testing.assert_array_equal(emask, together.expanded_attention_mask)
    np.testing.assert_allclose(embeds[0, 3:3 + n], tokens[0], rtol=0, atol=0)
    llm_logits = llm_apply({"params": params["llm"]}, inputs_embeds=embeds,
                           attention_mask=emask).logits
    np.testing.assert_allclose(np.take_along_axis(np.asarray(llm_logits), positions[..., None], 1),
                               together.logits, rtol=1e-5, atol=1e-5)


def test_vision_tower_is_frozen_and_projector_learns(video_model):
    model, params = video_model
    ids = np.array([[3, IMAGE_ID, 5, 6]], np.int32)
    frames = random_frames((1, 3, 32, 32, 3), seed=9)

    def loss(p):
        return jnp.mean(model.apply({"params": p}, ids, frames=frames).logits ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    assert all(not np.any(g) for g in jax.tree.leaves(grads["vision"]))
    assert all(np.any(g) for g in jax.tree.leaves(grads["projector"]))


def test_reward_and_value_heads(hf_llava):
    model, params = rlaif_jax.from_pretrained(hf_llava[0], num_frames=3, reward_head=True,
                                              value_head=True)
    assert set(params) == {"vision", "projector", "llm", "reward_head", "value_head"}
    ids = np.array([[0, 0, 3, IMAGE_ID, 5, 6], [3, IMAGE_ID, 7, 8, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    frames = random_frames((2, 3, 32, 32, 3), seed=10)
    out = jit_apply(model)({"params": params}, ids, mask, frames=frames)
    assert out.reward.shape == (2,) and out.values.shape == (2, 6)
    np.testing.assert_array_equal(out.values, 0.0)  # zero-initialised value head
    score = params["reward_head"]["score"]
    last = np.asarray(out.last_hidden_state)[[0, 1], [5, 3]]  # last real token of each row
    np.testing.assert_allclose(out.reward, last @ score["kernel"][:, 0] + score["bias"][0],
                               rtol=1e-5, atol=1e-6)


def _batch(**changes):
    ids = np.array([[3, IMAGE_ID, 5, 6], [0, 3, 7, 8]], np.int32)
    batch = dict(input_ids=ids, attention_mask=(ids != 0).astype(np.int32),
                 frames=np.zeros((2, 3, 32, 32, 3), np.uint8), has_video=np.array([True, False]))
    batch.update(changes)
    return batch


@pytest.mark.parametrize("changes,message", [
    (dict(has_video=np.array([False, False])),
     r"more <image> placeholders \(1\) than videos \(0\)"),
    (dict(input_ids=np.array([[3, IMAGE_ID, 5, 6], [3, IMAGE_ID, 7, 8]], np.int32)),
     r"more <image> placeholders \(2\) than videos \(1\): row 1"),
    (dict(frames=None), r"more <image> placeholders \(1\) than videos \(0\)"),
    (dict(input_ids=np.array([[3, IMAGE_ID, IMAGE_ID, 6], [0, 3, 7, 8]], np.int32)),
     "row 0 has 2 <image> placeholders"),
    (dict(input_ids=np.array([[3, IMAGE_ID, 5, 97], [0, 3, 7, 8]], np.int32)),
     r"row 0, position 3: token id 97 is outside the vocabulary \[0, 97\)"),
    (dict(input_ids=np.array([[3, -200, 5, 6], [0, 3, 7, 8]], np.int32)),
     "map_reference_image_token"),
    (dict(has_video=np.array([True, True])), "row 1 has a video but no <image> placeholder"),
    (dict(frames=np.zeros((2, 3, 64, 64, 3), np.uint8)), r"frames must be \[B=2, T, 32, 32, 3\]"),
])
def test_validate_batch_fails_clearly(image_model, changes, message):
    config = image_model[0].config
    validate_batch(_batch(), config)  # the unchanged batch is fine
    with pytest.raises(BatchError, match=message):
        validate_batch(_batch(**changes), config)


def test_presets_and_video_llava_7b_parameter_count():
    tiny = VideoLLMConfig.from_dict(models.get_config("video_tiny"))
    assert tiny.num_frames == 8 and tiny.pooling == "spatiotemporal"
    assert tiny.projector_type == "mlp2x_gelu"
    assert tiny.image_token_id == tiny.llm.vocab_size and tiny.num_video_tokens == 8 + 16
    big = VideoLLMConfig.from_dict(models.get_config("video_llava_7b"))
    assert (big.num_frames, big.num_video_tokens, big.llm.hidden_size) == (50, 50 + 576, 4096)
    abstract = abstract_params(VideoLLM(big), jnp.zeros((1, 1), jnp.int32))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    hf_config = video_llm_config_to_llava_hf(big)
    hf_config["image_token_index"] = 0  # (out of vocabulary here; no effect on the count)
    hf_config = transformers.LlavaConfig(**{k: v for k, v in hf_config.items()
                                            if k not in ("architectures", "rlaif_video")})
    with torch.device("meta"):
        theirs = sum(p.numel() for p in
                     transformers.LlavaForConditionalGeneration(hf_config).parameters())
    assert ours == theirs


def test_video_tiny_preset_runs_on_eight_frames():
    config = VideoLLMConfig.from_dict(models.get_config("video_tiny"))
    model = VideoLLM(config)
    ids = np.array([[1, config.image_token_id, 5, 6]], np.int32)
    frames = random_frames((1, 8, 64, 64, 3))
    # Shapes only (a trace, no compile): running is covered on the transformers-built models.
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, frames=frames)["params"]
    out = jax.eval_shape(lambda p: model.apply({"params": p}, ids, frames=frames,
                                               return_expanded=True), params)
    assert out.logits.shape == (1, 4, config.llm.vocab_size)
    assert out.expanded_attention_mask.shape == (1, 4 + 24 - 1)
