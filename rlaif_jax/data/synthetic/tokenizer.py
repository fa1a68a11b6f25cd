"""A small byte-level BPE tokenizer trained on the synthetic world's text.

Saved as a `PreTrainedTokenizerFast` directory, so `AutoTokenizer.from_pretrained(dir)` loads it
offline. Like LLaMA's, it prepends `<s>` when asked for special tokens; `<image>` is a special
token (one id), and the judge's labels are single tokens after "ASSISTANT:".

The template's system sentence, the same 29 BPE tokens at the start of every row, is one token
of its own (an added token, matched before the BPE): it was about 40% of the tokens of a short
row, so every stage's compute went a third into a sentence that says nothing about the video.
The reward model's fixed evaluation prompt (about 70 tokens a row) likewise. They still render
and decode as the same text; real checkpoints keep their own tokenizers.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rlaif_jax.data import conversation, prompts

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
# Texts many rows repeat verbatim, each kept as one (non-special) token: the system sentence
# (every row) and the reward model's evaluation question and score prefix (every RM row); the
# leads of the clip question and of the context (every context and context-reading row).
TEMPLATE_TOKENS = ((prompts.VICUNA_V1_SYSTEM,) + prompts.rm_evaluation_prompt()
                   + (prompts.CLIP_QUESTION_LEAD, prompts.CONTEXT_LEAD))
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, prompts.IMAGE_TOKEN)
DEFAULT_VOCAB_SIZE = 1000


def train_tokenizer(texts: Iterable[str], out_dir: str,
                    vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Trains on `texts` and saves to `out_dir`; a word seen twice becomes (mostly) one token."""
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=True),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens=[prompts.IMAGE_TOKEN], model_max_length=4096)
    # After training, so that the BPE merges (and every other id) are those of the corpus.
    tokenizer.add_tokens([AddedToken(text, normalized=False, special=False)
                          for text in TEMPLATE_TOKENS])
    conversation.judge_choice_token_ids(tokenizer)  # raises if a label spans several tokens
    tokenizer.save_pretrained(out_dir)
    return tokenizer
