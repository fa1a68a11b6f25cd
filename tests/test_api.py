"""`rlaif_jax.from_pretrained` on the project's own stage and step directories (the SFT smoke
stage of the session's workdir; nothing is trained here), and its one-line errors for
directories it cannot read. The later stages (policy init, RM, PPO) are loaded in
test_main_job.py, from the main job's workdir.
"""

import json
import os

import jax
import numpy as np
import pytest
import transformers

import rlaif_jax
from rlaif_jax.checkpoints.orbax_io import read_step_dir, resolve_checkpoint
from rlaif_jax.checkpoints.safetensors_io import CheckpointError
from rlaif_jax.data import conversation
from rlaif_jax.models.video_llm import VideoLLM
from rlaif_jax.parallel.mesh import make_mesh


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def test_sft_stage_dir_loads_as_the_model_it_trained(smoke_workdir):
    stage_dir = os.path.join(smoke_workdir, "sft")
    step_dir = resolve_checkpoint(stage_dir)[1]
    saved = _flat(read_step_dir(step_dir)[0]["params"])
    tokenizer_dir = rlaif_jax.tokenizer_path(stage_dir)
    assert tokenizer_dir == os.path.join(smoke_workdir, "data", "world", "tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)

    model, params = rlaif_jax.from_pretrained(stage_dir)
    assert isinstance(model, VideoLLM)
    # The architecture the stage trained: the world tokenizer's vocabulary and <image> id.
    assert model.config.llm.vocab_size == conversation.vocabulary_size(tokenizer)
    assert model.config.image_token_id == conversation.image_token_id(tokenizer)
    assert model.config.llm.eos_token_id == tokenizer.eos_token_id
    loaded = _flat(params)
    assert loaded.keys() == saved.keys()  # the smoke SFT stage trains (so saves) every param
    for path, value in saved.items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=path)

    # The step directory, sharded over a mesh of 8, with overrides on top: the same weights.
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    model16, sharded = rlaif_jax.from_pretrained(step_dir, mesh=mesh, dtype="bfloat16",
                                                 reward_head=True)
    assert model16.config.llm.dtype == "bfloat16" and model16.config.vision.dtype == "bfloat16"
    assert model16.config.reward_head and "reward_head" in sharded  # a fresh head, as asked
    embed = sharded["llm"]["embed_tokens"]  # [vocab, embed]: embed on fsdp (DEFAULT_RULES)
    assert embed.sharding.mesh.shape["fsdp"] == 8 and len(embed.addressable_shards) == 8
    assert embed.addressable_shards[0].data.shape == (embed.shape[0], embed.shape[1] // 8)
    for path, value in _flat({k: v for k, v in sharded.items() if k != "reward_head"}).items():
        np.testing.assert_array_equal(value, saved[path], err_msg=path)


def test_directories_it_cannot_read_fail_in_one_line(tmp_path):
    def error(path) -> str:
        with pytest.raises(CheckpointError) as info:
            rlaif_jax.from_pretrained(str(path))
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "does not exist" in error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    message = error(tmp_path / "empty")
    assert "Hugging Face" in message and "stage, checkpoints/ or step directory" in message
    # A stage directory with its resolved config.json but no checkpoint yet: not read as HF.
    stage = tmp_path / "work" / "sft"
    (stage / "checkpoints").mkdir(parents=True)
    (stage / "config.json").write_text(json.dumps({"stage": "sft"}))
    assert "holds no checkpoint yet" in error(stage)
    # A config.json of something else (e.g. WORKDIR/feedback's resolved config).
    other = tmp_path / "feedback"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"stage": "feedback"}))
    message = error(other)
    assert "model_type None" in message and "'llava'" in message and "step directory" in message
