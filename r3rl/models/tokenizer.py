"""A small chat tokenizer trained locally, shaped like Qwen2-VL's.

No tokenizer files can be downloaded here, so the tiny reflector gets one trained on its own
corpus. It keeps Qwen2-VL's special tokens and chat conventions so the same processor and
adapter code run unchanged on it and on a real checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerFast

PAD, UNK = "<|endoftext|>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
THINK_TOKENS = ("<think>", "</think>")
# Vocabulary cap; a closed-world corpus (shapes critiques) stops merging far below it.
MAX_VOCAB = 8192
# Words plus the single space before them, each punctuation mark alone, runs of whitespace:
# every piece keeps its own spacing, so fusing the pieces back is an exact inverse.
PIECES = Regex(r" ?[a-z0-9]+| ?[^a-z0-9\s]|\s+")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _alphabet() -> list[str]:
    """Printable lower-case ASCII plus newline: any such text encodes without `<unk>`."""
    return [chr(c) for c in range(32, 127) if not chr(c).isupper()] + ["\n"]


def train_chat_tokenizer(
    corpus: Sequence[str], *, extra_special_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a lower-casing BPE on `corpus` and wrap it with Qwen-style specials and chat template.

    BPE (rather than word-level) so unseen words still encode from characters; corpus words
    end up as single tokens. `<think>`/`</think>` are single, non-special tokens so that
    decoding with `skip_special_tokens=True` keeps the reflection format visible.
    """
    specials = [PAD, IM_START, IM_END, *VISION_TOKENS, UNK, *extra_special_tokens]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(PIECES, behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB,
        special_tokens=specials,
        initial_alphabet=_alphabet(),
        show_progress=False,
    )
    # each text also after a space, so a word is one token at the start of a turn and mid-text;
    # plus the chat template's own words, so role headers are single tokens too
    tok.train_from_iterator(
        [*corpus, *(" " + t for t in corpus), "system", "user", "assistant"], trainer
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, IM_END, *VISION_TOKENS, *extra_special_tokens],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
