"""What PPO reads from the synthetic world: its prompts and its true reward.

- `PromptSource`: the world's PPO prompts (`ppo_prompts.json`, a `prompt` build made once under
  WORKDIR/data/), batch k = a seeded permutation's slice, so resuming at iteration k is a seek.
- `TruthScorer`: the true reward for the control run (`reward='truth'`): each response decoded
  and graded by the world's scorer against its video's truth (`Score.score`, in [0, 1]).
- `rm_suffix_ids`: the tokens the RM reads after a response, exactly as the RM stage wrote its
  rows (`conversation.tokenize_for_reward_model`): checked on a real question at start.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from rlaif_jax.data import conversation, prepare
from rlaif_jax.data.builders.items_json import load_items
from rlaif_jax.data.pipeline import Pipeline
from rlaif_jax.data.synthetic import score_answer, video_name
from rlaif_jax.parallel.mesh import ConfigError

PROMPT_KEYS = ("input_ids", "attention_mask", "frames", "has_video", "index")


class PromptSource:
    """The PPO loop's prompts: a shuffled prompt Pipeline (endless epochs), this process's rows
    of iteration k's batch."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def batch(self, iteration: int) -> dict:
        batch = self.pipeline.batch(iteration)
        return {k: batch[k] for k in PROMPT_KEYS}

    def record(self, index: int) -> dict:
        return self.pipeline.record(index)


def prompt_pipeline(world: str, build_dir: str, prompts_file: str, tokenizer, batch_size: int,
                    max_length: int, num_frames: int, size: int, seed: int):
    """The shuffled Pipeline of the world's PPO prompts (the build made on first use)."""
    if not os.path.isfile(os.path.join(world, prompts_file)):
        raise ConfigError(f"ppo: no prompt file {os.path.join(world, prompts_file)} (run the SFT "
                          "stage first to make the synthetic world, or set data.world)")
    try:
        prepare.prepare_build(world, build_dir, "prompt", {"train": prompts_file}, num_frames,
                              size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Pipeline(build_dir, "train", tokenizer, batch_size, max_length, seed, shuffle=True,
                    num_frames=num_frames)


def rm_suffix_ids(tokenizer, question_turn: Optional[dict] = None) -> np.ndarray:
    """The RM's tokens after a response's EOS (the evaluation prompt up to "...is"): the RM stage
    writes [prompt tokens] + [response tokens, EOS] + suffix. Checked on a sample row."""
    turn = question_turn or conversation.video_question("What colour is the circle?")
    prompt = list(conversation.tokenize_prompt(turn, tokenizer))
    response = "red"
    row = list(conversation.tokenize_for_reward_model(turn, response, tokenizer))
    answer = conversation.tokenize_with_offsets(
        conversation.render([turn, {"from": "gpt", "value": response}])[0], tokenizer)[0]
    if row[:len(prompt)] != prompt or answer[:len(prompt)] != prompt:
        raise ConfigError("ppo: the reward model's rows do not start with the generation prompt's "
                          "tokens; cannot score sampled responses as the RM was trained")
    eos = tokenizer.eos_token_id
    end = row.index(eos, len(prompt)) + 1  # the response's closing EOS
    return np.asarray(row[end:], np.int32)


def decode_response(tokens: np.ndarray, mask: np.ndarray, tokenizer) -> str:
    ids = [int(t) for t, m in zip(tokens, mask) if m and int(t) != tokenizer.eos_token_id]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


class TruthScorer:
    """score_fn(rollout) -> the world scorer's grade of each response (PPO's true reward)."""

    def __init__(self, source: PromptSource, prompts_path: str, truths: dict, tokenizer):
        self.source, self.truths, self.tokenizer = source, truths, tokenizer
        items = load_items(prompts_path)
        self.items = {str(item.get("id", item.get("uid", i))): item
                      for i, item in enumerate(items) if isinstance(item, dict)}

    def question_and_truth(self, index: int) -> tuple[str, Optional[dict]]:
        record = self.source.record(index)
        turn = conversation.first_human_turn(
            [{"from": r, "value": v} for r, v in zip(record["roles"], record["values"])])
        question = turn["value"].replace("<image>", "").strip()
        images = self.items.get(str(record["id"]), {}).get("images")
        name = video_name(images) if isinstance(images, str) else ""
        return question, self.truths.get(name)

    def __call__(self, rollout) -> np.ndarray:
        scores = np.zeros(len(rollout["response"]), np.float32)
        for row, index in enumerate(np.asarray(rollout["index"])):
            if index < 0:
                continue
            question, truth = self.question_and_truth(int(index))
            if truth is None:
                continue
            text = decode_response(rollout["response"][row], rollout["mask"][row], self.tokenizer)
            scores[row] = score_answer(truth, question, text).score
        return scores
