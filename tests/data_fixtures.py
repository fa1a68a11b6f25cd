"""Shared data fixtures: a small synthetic world and builds of it, made once per test session.

Each artefact is made at a fixed place under pytest's base temp directory with a marker file, so
test modules that import these fixtures share one copy instead of making their own.
"""
from __future__ import annotations

import io
import os
import shutil

import pytest

WORLD_ARGS = dict(num_train=12, num_eval=4, frames=8, size=64, seed=0)


def _once(tmp_path_factory, name: str, make) -> str:
    path = tmp_path_factory.getbasetemp() / name
    marker = path / ".complete"
    if not marker.exists():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        make(str(path))
        marker.touch()
    return str(path)


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> str:
    from rlaif_jax.data.synthetic import generate_world

    return _once(tmp_path_factory, "world",
                 lambda out: generate_world(out, progress=False, **WORLD_ARGS))


@pytest.fixture(scope="session")
def world_tokenizer(world_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(world_dir, "tokenizer"))


def _build(tmp_path_factory, world_dir: str, kind: str, json_files: dict, name: str) -> str:
    from rlaif_jax.data.build import build

    files = {split: os.path.join(world_dir, f) for split, f in json_files.items()}
    # Items name paths relative to the world; QA files name videos found in world/videos.
    video_root = os.path.join(world_dir, "videos") if kind == "qa" else world_dir
    return _once(tmp_path_factory, name,
                 lambda out: build(kind, files, video_root, out, num_frames=8, size=64,
                                   verbose=False))


@pytest.fixture(scope="session")
def instruction_data(tmp_path_factory, world_dir) -> str:
    return _build(tmp_path_factory, world_dir, "instruction",
                  {"short": "sft_short.json", "long": "sft_long.json"}, "build_instruction")


@pytest.fixture(scope="session")
def preference_data(tmp_path_factory, world_dir) -> str:
    return _build(tmp_path_factory, world_dir, "preference",
                  {"train": "preferences_oracle.json"}, "build_preference")


@pytest.fixture(scope="session")
def prompt_data(tmp_path_factory, world_dir) -> str:
    return _build(tmp_path_factory, world_dir, "prompt", {"train": "ppo_prompts.json"},
                  "build_prompt")


@pytest.fixture(scope="session")
def qa_data(tmp_path_factory, world_dir) -> str:
    return _build(tmp_path_factory, world_dir, "qa",
                  {"qa": "eval_qa.json", "consistency": "eval_consistency.json"}, "build_qa")


@pytest.fixture(scope="session")
def llama_tokenizer(tmp_path_factory, world_dir):
    """A tiny LLaMA-style SentencePiece tokenizer (no `<image>` token, pad = unk = 0, bos 1,
    eos 2), loaded the way real Vicuna checkpoints are: tokenizer.model + tokenizer_config."""
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from rlaif_jax.data import prompts

    def make(out: str) -> None:
        with open(os.path.join(world_dir, "descriptions.json")) as f:
            texts = [d["description"] for d in json.load(f).values()]
        texts += [prompts.VICUNA_V1_SYSTEM + " USER: ASSISTANT:",
                  prompts.judge_prompt("q", "a", "b", "c"), *prompts.rm_evaluation_prompt()]
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts * 3), model_writer=model, vocab_size=400,
            model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=1.0, minloglevel=2)
        with open(os.path.join(out, "tokenizer.model"), "wb") as f:
            f.write(model.getvalue())
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                       "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                       "add_bos_token": True, "add_eos_token": False, "legacy": False}, f)

    return AutoTokenizer.from_pretrained(_once(tmp_path_factory, "llama_tokenizer", make))


def write_mixed_items(world_dir: str, root: str) -> str:
    """A video root and instruction JSON mixing good and bad items; returns the JSON path.

    Expected: 4 kept (two items sharing one video, a frame-folder item, a text-only item) and
    one skipped for each reason below.
    """
    import json

    from PIL import Image

    from rlaif_jax.data import video

    os.makedirs(os.path.join(root, "frames", "clip"), exist_ok=True)
    good = os.path.join(world_dir, "videos", "train_00000.mp4")
    shutil.copy(good, os.path.join(root, "good.mp4"))
    with open(os.path.join(root, "corrupt.mp4"), "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    open(os.path.join(root, "empty.mp4"), "wb").close()
    raw = video.load_frames(good, num_frames=8, size=64)
    for i, frame in enumerate(raw):
        Image.fromarray(frame).save(os.path.join(root, "frames", "clip", f"{i:04d}.png"))

    def item(name, source, question="<image>\nWhat colour is the square?"):
        entry = {"id": name, "conversations": [{"from": "human", "value": question},
                                               {"from": "gpt", "value": "red"}]}
        if source is not None:
            entry["images"] = source
        return entry

    frame_list = [f"frames/clip/{i:04d}.png" for i in range(8)]
    items = [
        item("good_1", "good.mp4"),
        item("good_2", "good.mp4", "<image>\nWhich way does the square move?"),
        item("folder", frame_list),
        item("text_only", None, "Which colour is a ripe tomato?"),
        item("corrupt", "corrupt.mp4"),
        item("empty", "empty.mp4"),
        item("missing", "missing.mp4"),
        item("no_placeholder", "good.mp4", "What colour is the square?"),
        item("placeholder_no_video", None),
        {"id": "malformed", "images": "good.mp4"},
    ]
    path = os.path.join(root, "mixed.json")
    with open(path, "w") as f:
        json.dump(items, f)
    return path


MIXED_SKIPS = {"corrupt": 1, "empty": 1, "missing": 1, "video_without_placeholder": 1,
               "placeholder_without_video": 1, "malformed": 1}


@pytest.fixture(scope="session")
def mixed_data(tmp_path_factory, world_dir) -> str:
    from rlaif_jax.data.build import build

    def make(out: str) -> None:
        root = os.path.join(out, "root")
        json_path = write_mixed_items(world_dir, root)
        build("instruction", {"train": json_path}, root, os.path.join(out, "data"),
              num_frames=8, size=64, verbose=False)

    return os.path.join(_once(tmp_path_factory, "build_mixed", make), "data")
