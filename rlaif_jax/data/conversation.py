"""The vicuna_v1 chat template, tokenisation around the `<image>` placeholder, and label masks.

A conversation is the reference JSON's list of turns: `[{"from": "human"|"gpt", "value": str}]`.
It is rendered to one string (LLaVA's `vicuna_v1`), then tokenised chunk by chunk around each
`<image>` so that the placeholder is exactly one id whatever the tokenizer. Labels come from
character offsets: a token is trained on when it overlaps an assistant answer (its closing `</s>`
included, and the space that leads into it), so the mask is right for byte-level BPE and
SentencePiece alike.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from rlaif_jax.data import prompts

IGNORE_INDEX = -100


class TooLong(ValueError):
    """An item that cannot be fitted to the length limit (the caller skips and counts it)."""


class PlaceholderWouldBeCut(TooLong):
    """Truncating to the length limit would drop the `<image>` placeholder."""


@dataclasses.dataclass(frozen=True)
class Tokenized:
    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n], IGNORE_INDEX where no loss
    truncated: bool = False


def image_token_id(tokenizer) -> int:
    """The `<image>` id: the tokenizer's own special token, else the first id past its vocabulary."""
    # convert_tokens_to_ids, not get_vocab(): this runs for every item and get_vocab builds a dict.
    found = tokenizer.convert_tokens_to_ids(prompts.IMAGE_TOKEN)
    if found is not None and (found != tokenizer.unk_token_id
                              or tokenizer.unk_token == prompts.IMAGE_TOKEN):
        return int(found)
    return len(tokenizer)


def vocabulary_size(tokenizer) -> int:
    return len(tokenizer)


def check_ids_in_vocabulary(ids: np.ndarray, tokenizer) -> None:
    """A JAX gather clamps out-of-range ids silently, so every non-placeholder id is checked here."""
    image_id = image_token_id(tokenizer)
    text_ids = ids[ids != image_id]
    if text_ids.size and (text_ids.min() < 0 or text_ids.max() >= vocabulary_size(tokenizer)):
        raise ValueError(
            f"token ids outside [0, {vocabulary_size(tokenizer)}): "
            f"min {text_ids.min()}, max {text_ids.max()}"
        )


def render(turns: Sequence[dict], system: str = prompts.VICUNA_V1_SYSTEM,
           open_last: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Renders turns with vicuna_v1; returns the text and the character spans of the answers.

    `open_last=True` leaves the final assistant turn open (no `</s>`), for generation prompts and
    the reward model's score prefix; a final assistant turn with value None renders "ASSISTANT:".
    """
    text = system + prompts.TURN_SEPARATOR
    answer_spans = []
    for position, turn in enumerate(turns):
        role = prompts.ROLE_NAMES[turn["from"]]
        value = turn["value"]
        is_last = position == len(turns) - 1
        if value is None:
            if not (is_last and role == prompts.ASSISTANT_ROLE):
                raise ValueError("only a final assistant turn may be empty")
            text += f"{role}:"
            break
        text += f"{role}: "
        if role == prompts.USER_ROLE:
            text += value + prompts.TURN_SEPARATOR
        else:
            # The span starts at the space after "ASSISTANT:": SentencePiece glues that space to
            # the answer's first piece (or makes it a lone "▁" piece), which the model must learn
            # to emit first since generation prompts end at "ASSISTANT:".
            start = len(text) - 1
            text += value
            if not (is_last and open_last):
                text += prompts.END_OF_ANSWER
            answer_spans.append((start, len(text)))
    return text, answer_spans


def tokenize_many_with_offsets(texts: Sequence[str], tokenizer, add_bos: bool = True
                               ) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and their character spans of each text; each `<image>` becomes one id.

    Like LLaVA's `tokenizer_image_token`: a text is split at the placeholder and each chunk
    tokenised on its own, so a tokenizer without an `<image>` token gets the out-of-vocabulary
    id. All chunks of all texts go to the tokenizer in one batched call.
    """
    image_id = image_token_id(tokenizer)
    split_texts = [text.split(prompts.IMAGE_TOKEN) for text in texts]
    chunks = [chunk for parts in split_texts for chunk in parts if chunk]
    encoded = tokenizer(chunks, add_special_tokens=False, return_offsets_mapping=True) \
        if chunks else {"input_ids": [], "offset_mapping": []}
    encoded_chunks = iter(zip(encoded["input_ids"], encoded["offset_mapping"]))
    bos = tokenizer.bos_token_id if add_bos else None  # once: transformers' lookup is slow
    results = []
    for parts in split_texts:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        if bos is not None:
            ids.append(int(bos))
            offsets.append((0, 0))
        cursor = 0
        for index, chunk in enumerate(parts):
            if index > 0:
                ids.append(image_id)
                offsets.append((cursor - len(prompts.IMAGE_TOKEN), cursor))
            if chunk:
                chunk_ids, chunk_offsets = next(encoded_chunks)
                ids.extend(chunk_ids)
                offsets.extend((cursor + a, cursor + b) for a, b in chunk_offsets)
            cursor += len(chunk) + len(prompts.IMAGE_TOKEN)
        results.append((ids, offsets))
    return results


def tokenize_with_offsets(text: str, tokenizer, add_bos: bool = True
                          ) -> tuple[list[int], list[tuple[int, int]]]:
    """tokenize_many_with_offsets for one text."""
    return tokenize_many_with_offsets([text], tokenizer, add_bos)[0]


def truncate(tokenized: Tokenized, max_length: int | None, image_id: int) -> Tokenized:
    """Cuts training tokens at the end to max_length; raises PlaceholderWouldBeCut rather than
    cut a placeholder."""
    ids, labels = tokenized.input_ids, tokenized.labels
    if max_length is None or len(ids) <= max_length:
        return tokenized
    if np.any(ids[max_length:] == image_id):
        raise PlaceholderWouldBeCut(
            f"the <image> placeholder lies past max_length={max_length}")
    return Tokenized(ids[:max_length], labels[:max_length], True)


def tokenize_conversation(turns: Sequence[dict], tokenizer, max_length: int | None = None,
                          open_last: bool = False, train_on_answers: bool = True) -> Tokenized:
    """Training tokens: the whole conversation, labels on the assistants' answers only.

    Over-long conversations are cut at the end; raises PlaceholderWouldBeCut rather than cut the
    placeholder (the caller skips and counts the item).
    """
    return tokenize_conversations([turns], tokenizer, max_length, open_last, train_on_answers)[0]


def tokenize_conversations(conversations: Sequence[Sequence[dict]], tokenizer,
                           max_length: int | None = None, open_last: bool = False,
                           train_on_answers: bool = True) -> list[Tokenized]:
    """tokenize_conversation of many conversations, with one batched tokenizer call."""
    rendered = [render(turns, open_last=open_last) for turns in conversations]
    tokenized = tokenize_many_with_offsets([text for text, _ in rendered], tokenizer)
    image_id = image_token_id(tokenizer)
    rows = []
    for (_, spans), (ids, offsets) in zip(rendered, tokenized):
        ids_array = np.asarray(ids, np.int32)
        labels = np.full(len(ids), IGNORE_INDEX, np.int32)
        if train_on_answers and spans and len(ids):
            # A token is trained on when its (non-empty) character span overlaps an answer's.
            bounds = np.asarray(offsets, np.int64).reshape(-1, 2)  # [tokens, (start, end)]
            answers = np.asarray(spans, np.int64)  # [answers, (start, end)]
            overlaps = (bounds[:, :1] < answers[:, 1]) & (bounds[:, 1:] > answers[:, 0])
            trained = (bounds[:, 1] > bounds[:, 0]) & overlaps.any(axis=1)
            labels[trained] = ids_array[trained]
        labels[ids_array == image_id] = IGNORE_INDEX
        rows.append(Tokenized(ids_array, labels))
    if rows:  # one check for all rows: it looks the vocabulary up each call
        check_ids_in_vocabulary(np.concatenate([row.input_ids for row in rows]), tokenizer)
    return [truncate(row, max_length, image_id) for row in rows]


def first_human_turn(turns: Sequence[dict]) -> dict:
    for turn in turns:
        if turn["from"] == "human":
            return turn
    raise ValueError("the conversation has no human turn")


def tokenize_prompt(question_turn: dict | str, tokenizer) -> np.ndarray:
    """A generation prompt: system, the one human turn, then "ASSISTANT:" (no truncation)."""
    return tokenize_prompts([question_turn], tokenizer)[0]


def tokenize_prompts(question_turns: Sequence[dict | str], tokenizer) -> list[np.ndarray]:
    """tokenize_prompt of many turns, with one batched tokenizer call."""
    texts = [render([{"from": "human", "value": turn} if isinstance(turn, str) else turn,
                     {"from": "gpt", "value": None}])[0] for turn in question_turns]
    results = []
    for ids, _ in tokenize_many_with_offsets(texts, tokenizer):
        ids_array = np.asarray(ids, np.int32)
        check_ids_in_vocabulary(ids_array, tokenizer)
        results.append(ids_array)
    return results


def reward_model_turns(question_turn: dict, response: str) -> list[dict]:
    """A conversation scored by the reward model: question, response, then the evaluation prompt.

    Tokenise it with `open_last=True`; the score is read at the last token.
    """
    user, assistant_prefix = prompts.rm_evaluation_prompt()
    return [question_turn, {"from": "gpt", "value": response},
            {"from": "human", "value": user}, {"from": "gpt", "value": assistant_prefix}]


def tokenize_for_reward_model(question_turn: dict, response: str, tokenizer,
                              max_length: int | None = None) -> np.ndarray:
    """Reward-model tokens of one candidate; an over-long response is cut, never the question
    or the evaluation prompt, since the score is read at the very last token."""
    return reward_model_row(question_turn, response, tokenizer, max_length)[0]


def reward_model_row(question_turn: dict, response: str, tokenizer,
                     max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, response_mask) of one candidate, as `tokenize_for_reward_model`: the mask is 1 on
    the response's tokens (its closing eos included), which an RM with a likelihood term
    (rm/model.py) scores."""
    text, spans = render(reward_model_turns(question_turn, response), open_last=True)
    ids, offsets = tokenize_with_offsets(text, tokenizer)
    ids_array = np.asarray(ids, np.int32)
    check_ids_in_vocabulary(ids_array, tokenizer)
    start, end = spans[0]  # the response (with its </s>)
    in_response = np.array([s < end and e > start for s, e in offsets])
    if max_length is None or len(ids) <= max_length:
        return ids_array, in_response.astype(np.int32)
    response_positions = np.flatnonzero(in_response)
    excess = len(ids) - max_length
    # Drop the response's last tokens but keep its closing eos (the response ends cleanly).
    keep_eos = ids[response_positions[-1]] == tokenizer.eos_token_id
    if excess > len(response_positions) - int(keep_eos):
        raise TooLong(
            f"question and evaluation prompt alone exceed max_length={max_length}")
    last_kept = response_positions[-1] - (1 if keep_eos else 0)
    drop = np.arange(last_kept - excess + 1, last_kept + 1)
    return np.delete(ids_array, drop), np.delete(in_response, drop).astype(np.int32)


def left_pad(rows: Sequence[Sequence[int]], pad: int, length: Optional[int] = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 [len(rows), length] of token rows left-padded with `pad` (generation
    prompts end at the same slot); `length` defaults to the longest row."""
    length = max(len(r) for r in rows) if length is None else length
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    return ids, mask


def video_question(question: str) -> dict:
    """A human turn about a video: the placeholder, a newline, then the question (as LLaVA)."""
    return {"from": "human", "value": f"{prompts.IMAGE_TOKEN}\n{question}"}


def judge_choice_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids of the judge's labels as they follow "ASSISTANT:"; each label must be a single token."""
    base = tokenize_prompt("x", tokenizer)
    choice_ids = []
    for choice in prompts.JUDGE_CHOICES:
        text, _ = render([{"from": "human", "value": "x"}, {"from": "gpt", "value": choice}],
                         open_last=True)
        ids = tokenize_with_offsets(text, tokenizer)[0]
        if len(ids) != len(base) + 1 or list(ids[:len(base)]) != list(base):
            raise ValueError(f"judge label {choice!r} is not a single token after 'ASSISTANT:'")
        choice_ids.append(int(ids[-1]))
    return tuple(choice_ids)
