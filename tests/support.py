"""What the tests share: tiny random models (ours and the `transformers` reference), random
batches, a word-level tokenizer, and session fixtures (a small synthetic world and its builds,
the SFT `smoke` stage run once) that every test package may use.

Session artefacts are made at a fixed place under pytest's base temp directory with a marker
file, so every test module that uses them shares one copy.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from rlaif_jax.models.clip_vision import ClipVisionConfig
from rlaif_jax.models.llama import Llama, LlamaConfig
from rlaif_jax.models.lora import LoraConfig
from rlaif_jax.models.video_llm import VideoLLM, VideoLLMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


# ---------------------------------------------------------------------------------------------
# A word-level `transformers` tokenizer saved next to a tiny random HF model, for tests.

SPECIAL = ("<unk>", "<s>", "</s>")


def save_word_tokenizer(directory: str, vocab_size: int, words: Iterable[str] = (),
                        texts: Iterable[str] = ()) -> transformers.PreTrainedTokenizerFast:
    vocab = list(SPECIAL)
    split = tokenizers.pre_tokenizers.Whitespace()
    for word in list(words) + [w for text in texts for w, _ in split.pre_tokenize_str(text)]:
        if word not in vocab:
            vocab.append(word)
    if len(vocab) > vocab_size:
        raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size}")
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = split
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<unk>")
    tokenizer.save_pretrained(directory)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Tiny random `transformers` models built and saved locally: the PyTorch reference in tests.

def tiny_hf_llama_config(**overrides) -> transformers.LlamaConfig:
    values = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
                  max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def save_tiny_hf_llama(directory, seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tiny_hf_llama_config(**overrides)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    # Random (not zero) norm weights, so a wrong mapping of norms cannot hide.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    return model


def left_padded_batch(vocab_size: int, lengths, total: int, seed: int = 0):
    """input_ids, attention_mask (numpy int32) with rows left-padded to `total`."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = rng.integers(3, vocab_size, n)
        mask[row, total - n:] = 1
    return ids, mask


def hf_logits(model, input_ids, attention_mask) -> np.ndarray:
    """Reference logits; positions from the mask, as `generate` computes them."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()


def assert_close_scaled(ours, ref, mask=None, rel: float = 1e-4):
    """The forward tolerance (docs/method.md): max |ours - ref| <= rel * max |ref| on real
    positions."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        keep = np.asarray(mask).astype(bool)
        ours, ref = ours[keep], ref[keep]
    err, scale = np.max(np.abs(ours - ref)), np.max(np.abs(ref))
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel} * max |ref| {scale:.3e}"


def _randomize_norms(model):
    """Random (not one/zero) LayerNorm/RMSNorm weights, so a wrong mapping of norms cannot hide."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                if name.endswith("bias"):
                    param.copy_(0.1 * torch.randn_like(param))
                else:
                    param.copy_(1.0 + 0.1 * torch.randn_like(param))


def tiny_hf_clip_vision_config(**overrides) -> transformers.CLIPVisionConfig:
    values = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  image_size=32, patch_size=8, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    values.update(overrides)
    return transformers.CLIPVisionConfig(**values)


def save_tiny_hf_clip_vision(directory, seed: int = 0, **overrides) -> transformers.CLIPVisionModel:
    torch.manual_seed(seed)
    config = tiny_hf_clip_vision_config(**overrides)
    config._attn_implementation = "eager"
    model = transformers.CLIPVisionModel(config).eval()
    _randomize_norms(model)
    model.save_pretrained(directory)
    return model


# Head size 64 as in every OpenAI CLIP ViT (original LLaVA configs do not name the head count).
TINY_LLAVA_VISION = dict(hidden_size=128, num_attention_heads=2, intermediate_size=160,
                         num_hidden_layers=2)


def save_tiny_hf_llava(directory, seed: int = 0, image_token_index: int = 96, vision=None,
                       **text_overrides) -> transformers.LlavaForConditionalGeneration:
    """A tiny LlavaForConditionalGeneration whose placeholder id sits inside the vocabulary."""
    torch.manual_seed(seed)
    text = tiny_hf_llama_config(**text_overrides).to_dict()
    vision = dict(TINY_LLAVA_VISION, **(vision or {}))
    config = transformers.LlavaConfig(
        vision_config=tiny_hf_clip_vision_config(**vision).to_dict(), text_config=text,
        image_token_index=image_token_index, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config._attn_implementation = "eager"
    model = transformers.LlavaForConditionalGeneration(config).eval()
    _randomize_norms(model)
    model.save_pretrained(directory)
    return model


def random_frames(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def clip_pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> CLIPImageProcessor's normalisation, NCHW float32."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    pixels = (images.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------------------------------------
# Shared pieces for the training tests: a tiny random LLaMA and random SFT batches.

IGNORE = -100


def tiny_llama(lora_rank: int = 0, **changes) -> Llama:
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=64,
                         lora=LoraConfig(rank=lora_rank, alpha=16.0))
    return Llama(config.replace(**changes))


def init_variables_fn(model: Llama, length: int = 16):
    def init(rng):
        return model.init(rng, jnp.zeros((1, length), jnp.int32))
    return init


def random_sft_batch(seed: int, batch: int = 8, length: int = 16, vocab: int = 128) -> dict:
    """Right-padded rows: a prompt (no loss), an answer (loss), then padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
    mask = np.zeros((batch, length), np.int32)
    labels = np.full((batch, length), IGNORE, np.int32)
    for row in range(batch):
        real = rng.integers(length // 2, length + 1)
        prompt = rng.integers(2, real - 1)
        mask[row, :real] = 1
        ids[row, real:] = 0
        labels[row, prompt:real] = ids[row, prompt:real]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# A tiny random video LLM with a reward head, and random preference batches, for RM tests.

VOCAB = 96
IMAGE_ID = VOCAB  # the first id past the vocabulary
FRAMES, SIZE = 2, 32


def tiny_video_config(lora_rank: int = 0, reward_head: bool = True, **llm_changes
                      ) -> VideoLLMConfig:
    vision = ClipVisionConfig(image_size=SIZE, patch_size=16, hidden_size=32,
                              intermediate_size=64, num_layers=2, num_heads=2)
    llm = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=128,
                      lora=LoraConfig(rank=lora_rank, alpha=16.0)).replace(**llm_changes)
    return VideoLLMConfig(vision=vision, llm=llm, num_frames=FRAMES, image_token_id=IMAGE_ID,
                          reward_head=reward_head)


def tiny_reward_model(lora_rank: int = 0, **changes) -> VideoLLM:
    return VideoLLM(tiny_video_config(lora_rank, **changes))


def init_fn(model):
    def init(rng):
        return model.init(rng, jnp.zeros((1, 8), jnp.int32))
    return init


def host_variables(model, seed: int = 1):
    return jax.device_get(jax.jit(lambda rng: nn.unbox(init_fn(model)(rng)))(
        jax.random.PRNGKey(seed)))


def random_preference_batch(seed: int, pairs: int = 8, length: int = 20) -> dict:
    """Right-padded candidate rows [B, 2, L] with one <image> after bos, random frames."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((pairs, 2, length), np.int32)
    mask = np.zeros((pairs, 2, length), np.int32)
    for p in range(pairs):
        for c in range(2):
            real = int(rng.integers(length // 2, length + 1))
            ids[p, c, :real] = rng.integers(3, VOCAB, size=real)
            ids[p, c, 0], ids[p, c, 1] = 1, IMAGE_ID
            mask[p, c, :real] = 1
    frames = rng.integers(0, 256, size=(pairs, FRAMES, SIZE, SIZE, 3)).astype(np.uint8)
    return {"input_ids": ids, "attention_mask": mask, "frames": frames,
            "has_video": np.ones(pairs, bool),
            "preference": rng.integers(1, 3, size=pairs).astype(np.int32)}


# ---------------------------------------------------------------------------------------------
# Shared data fixtures: a small synthetic world and builds of it, made once per test session.

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


# ---------------------------------------------------------------------------------------------
# Session fixtures of the whole chain on the `smoke` presets, shared by every stage's tests.



def override(config, **changes):
    """`config` with dotted keys set in place (`**{"lora.rank": 4}`), as --config.x=y would."""
    with config.unlocked():
        for key, value in changes.items():
            node = config
            *parents, leaf = key.split(".")
            for parent in parents:
                node = node[parent]
            node[leaf] = value
    return config


def launch_env(devices: int = 1) -> dict:
    """A subprocess's environment: `devices` CPU devices, and this checkout's package first
    (whatever copy of it a virtual environment may have installed)."""
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p]))
    return env


def launch(args: list[str], devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs launch/main.py in a fresh process with `devices` CPU devices."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py")] + args,
                          cwd=ROOT, env=launch_env(devices), capture_output=True, text=True,
                          timeout=timeout)


def run_module(module: str, args: list[str], devices: int = 8, timeout: int = 600
               ) -> subprocess.CompletedProcess:
    """Runs `python -m module args` from the repository in a fresh process."""
    return subprocess.run([sys.executable, "-m", module] + args, cwd=ROOT,
                          env=launch_env(devices), capture_output=True, text=True,
                          timeout=timeout)


def run_probe(module: str, workdir: str, out_dir) -> tuple[subprocess.CompletedProcess, dict,
                                                            dict]:
    """(process, its --json result, the world's truths) of a probe command (`python -m module
    WORKDIR/sft`, batch 8) on a workdir's SFT model; the result is {} when it failed."""
    out = os.path.join(str(out_dir), "probe.json")
    proc = run_module(module, [os.path.join(workdir, "sft"), "--batch_size", "8", "--json", out])
    result = json.load(open(out)) if proc.returncode == 0 else {}
    truths = json.load(open(os.path.join(workdir, "data", "world", "truth.json")))
    return proc, result, truths


def hand_made_truth(objects: list[dict], name: str = "eval_00000", num_frames: int = 8) -> dict:
    """A synthetic video's truth from its objects (64 px, 4 fps; events listed from them)."""
    from rlaif_jax.data.synthetic import world

    truth = {"name": name, "num_frames": num_frames, "size": 64, "fps": 4, "objects": objects}
    truth["events"] = world.list_events(truth)
    return truth


def run_smoke_sft(workdir: str) -> subprocess.CompletedProcess:
    result = launch(["--config=" + os.path.join(ROOT, "configs", "sft.py") + ":smoke",
                     f"--config.workdir={workdir}", "--config.log.progress=false"],
                    timeout=900)  # a loaded shared machine has taken over 5 minutes
    if result.returncode != 0:
        raise RuntimeError(f"the SFT smoke stage failed:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory) -> str:
    """A workdir holding the trained `smoke` SFT stage (made once per session)."""
    path = tmp_path_factory.getbasetemp() / "smoke_workdir"
    marker = path / ".sft_complete"
    if not marker.exists():
        path.mkdir(parents=True, exist_ok=True)
        result = run_smoke_sft(str(path))
        (path / "sft_stdout.txt").write_text(result.stdout)
        marker.touch()
    return str(path)


# ---------------------------------------------------------------------------------------------
# Stage settings from the configs (the one place their defaults live)


def ppo_settings(eos_token_id: int = 2, pad_token_id: int = 0, **changes):
    """PPOSettings of configs/ppo.py's tiny preset with `changes` to its `ppo` section."""
    from configs import ppo as ppo_configs
    from rlaif_jax.ppo.trainer import settings_from_config

    config = override(ppo_configs.get_config("tiny"), **{f"ppo.{k}": v for k, v in changes.items()})
    return settings_from_config(config, eos_token_id, pad_token_id)


def feedback_settings(**changes):
    """FeedbackSettings of configs/feedback.py's tiny preset with `changes` (dotted keys)."""
    from configs import feedback as feedback_configs
    from rlaif_jax.feedback.stage import settings_from_config

    return settings_from_config(override(feedback_configs.get_config("tiny"), **changes))
