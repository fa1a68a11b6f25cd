"""A word-level `transformers` tokenizer saved next to a tiny random HF model, for tests.

Ids are predictable: <unk>=0, <s>=1, </s>=2, then `words` in order, then the words of `texts`
(whitespace / punctuation split), each once, then filler words up to `vocab_size`.
"""

from __future__ import annotations

from typing import Iterable

import tokenizers
import transformers

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
