"""A small byte-level BPE tokenizer trained on the synthetic world's text.

Saved as a `PreTrainedTokenizerFast` directory, so `AutoTokenizer.from_pretrained(dir)` loads it
offline. Like LLaMA's, it prepends `<s>` when asked for special tokens; `<image>` is a special
token (one id), and the judge's labels are single tokens after "ASSISTANT:".
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rlaif_jax.data import conversation, prompts

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
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
    conversation.judge_choice_token_ids(tokenizer)  # raises if a label spans several tokens
    tokenizer.save_pretrained(out_dir)
    return tokenizer
