"""vicuna_v1 rendering, the `<image>` placeholder and label masks, with the synthetic byte-level
BPE tokenizer and a tiny SentencePiece LLaMA tokenizer (the path real Vicuna checkpoints take)."""
import numpy as np
import pytest

from rlaif_jax.data import conversation, prompts

TURNS = [
    conversation.video_question("What colour is the square?"),
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Which way does the circle move?"},
    {"from": "gpt", "value": "it does not move"},
]
PROMPT_TEXT = (prompts.VICUNA_V1_SYSTEM + " USER: <image>\nWhat colour is the square? "
               "ASSISTANT: red</s>USER: Which way does the circle move? ASSISTANT: "
               "it does not move</s>")


def test_render_vicuna_v1():
    text, spans = conversation.render(TURNS)
    assert text == PROMPT_TEXT
    assert [text[a:b] for a, b in spans] == [" red</s>", " it does not move</s>"]
    prompt, _ = conversation.render([TURNS[0], {"from": "gpt", "value": None}])
    assert prompt.endswith("What colour is the square? ASSISTANT:")


@pytest.fixture(params=["synthetic_bpe", "llama_sentencepiece"])
def tokenizer(request, world_tokenizer, llama_tokenizer):  # noqa: F811
    return world_tokenizer if request.param == "synthetic_bpe" else llama_tokenizer


def _runs(mask):
    """[start, end) of each run of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2], edges[1::2]))


def test_labels_only_on_assistant_tokens(tokenizer):
    tokens = conversation.tokenize_conversation(TURNS, tokenizer)
    ids, labels = tokens.input_ids, tokens.labels
    image_id = conversation.image_token_id(tokenizer)
    assert ids[0] == tokenizer.bos_token_id
    assert (ids == image_id).sum() == 1  # one placeholder id
    assert labels[ids == image_id] == conversation.IGNORE_INDEX
    assert np.all((ids != image_id) <= (ids < len(tokenizer)))
    # Token by token: a label is the token itself or ignored; trained tokens are exactly the two
    # answers, each closed by its eos, and nothing of the system, user turns or roles.
    trained = labels != conversation.IGNORE_INDEX
    np.testing.assert_array_equal(labels[trained], ids[trained])
    runs = _runs(trained)
    assert len(runs) == 2
    answers = [tokenizer.decode(ids[a:b]) for a, b in runs]
    assert [a.strip() for a in answers] == ["red</s>", "it does not move</s>"]
    assert all(ids[b - 1] == tokenizer.eos_token_id for _, b in runs)
    between = tokenizer.decode(ids[runs[0][1]:runs[1][0]]).strip()
    assert between == "USER: Which way does the circle move? ASSISTANT:"
    before_first = tokenizer.decode([int(i) for i in ids[1:runs[0][0]] if i != image_id])
    assert before_first.rstrip().endswith("ASSISTANT:")
    assert "USER:" in before_first and prompts.VICUNA_V1_SYSTEM[:20] in before_first


def test_tokenizer_without_image_token_gets_an_id_past_the_vocabulary(llama_tokenizer):  # noqa: F811
    assert "<image>" not in llama_tokenizer.get_vocab()
    assert conversation.image_token_id(llama_tokenizer) == len(llama_tokenizer)
    ids = conversation.tokenize_prompt(TURNS[0], llama_tokenizer)
    assert list(ids).count(len(llama_tokenizer)) == 1
    with pytest.raises(ValueError, match="outside"):
        conversation.check_ids_in_vocabulary(np.array([5, len(llama_tokenizer) + 1]),
                                             llama_tokenizer)


def test_truncation_never_cuts_the_placeholder(tokenizer):
    full = conversation.tokenize_conversation(TURNS, tokenizer)
    image_position = int(np.flatnonzero(full.input_ids == conversation.image_token_id(tokenizer))[0])
    cut = conversation.tokenize_conversation(TURNS, tokenizer, max_length=image_position + 3)
    assert cut.truncated and len(cut.input_ids) == image_position + 3
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:image_position + 3])
    with pytest.raises(conversation.PlaceholderWouldBeCut):
        conversation.tokenize_conversation(TURNS, tokenizer, max_length=image_position)


def test_generation_prompt_and_reward_model_rows(tokenizer):
    prompt = conversation.tokenize_prompt(TURNS[0], tokenizer)
    image_id = conversation.image_token_id(tokenizer)
    assert tokenizer.decode(prompt[prompt != image_id]).endswith("square? ASSISTANT:")
    assert tokenizer.eos_token_id not in prompt
    question = TURNS[0]
    long_response = "a red square moves right " * 20
    full = conversation.tokenize_for_reward_model(question, long_response, tokenizer)
    _, lead = prompts.rm_evaluation_prompt()
    assert tokenizer.decode(full).endswith(lead)
    limit = len(full) - 15
    cut = conversation.tokenize_for_reward_model(question, long_response, tokenizer, limit)
    assert len(cut) == limit
    assert tokenizer.decode(cut).endswith(lead)  # the evaluation prompt survives the cut
    # The response's closing eos and everything after it (the evaluation turn) are kept whole.
    tail = len(full) - int(np.flatnonzero(full == tokenizer.eos_token_id)[-1])
    assert tail >= 3
    np.testing.assert_array_equal(cut[-tail:], full[-tail:])
    with pytest.raises(conversation.TooLong):
        conversation.tokenize_for_reward_model(question, long_response, tokenizer, 20)
    # The response mask marks the response's tokens and its closing eos, whole or cut.
    for ids, (row, mask) in ((full, conversation.reward_model_row(question, long_response,
                                                                  tokenizer)),
                             (cut, conversation.reward_model_row(question, long_response,
                                                                 tokenizer, limit))):
        np.testing.assert_array_equal(row, ids)
        marked = np.flatnonzero(mask)
        assert np.all(np.diff(marked) == 1)  # one span
        prompt = conversation.tokenize_prompt(question, tokenizer)
        assert marked[0] == len(prompt) and row[marked[-1]] == tokenizer.eos_token_id
        assert len(row) - marked[-1] - 1 == tail - 1  # the evaluation turn follows
    assert tokenizer.decode(full[mask_full := conversation.reward_model_row(
        question, long_response, tokenizer)[1] > 0], skip_special_tokens=True).strip() == \
        long_response.strip()
    assert mask_full.sum() - conversation.reward_model_row(
        question, long_response, tokenizer, limit)[1].sum() == 15

