"""A small chat tokenizer trained locally, shaped like a real family's (Qwen2-VL's by default).

No tokenizer files can be downloaded here, so the tiny reflector gets one trained on its own
corpus. It keeps the family's special tokens and chat conventions (`ChatStyle`) so the same
processor and adapter code run unchanged on it and on a real checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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


# Gemma 3's chat conventions: turns end with <end_of_turn> (not eos), the assistant is "model",
# an image is <start_of_image>, which the processor expands into soft tokens
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class ChatStyle:
    """A family's special tokens and chat template. `named` become tokenizer attributes
    (`tokenizer.boi_token`, `tokenizer.boi_token_id`) that some processors read."""

    specials: tuple[str, ...]
    pad: str
    eos: str
    template: str
    bos: str | None = None
    named: Mapping[str, str] = field(default_factory=dict)
    words: tuple[str, ...] = ("system", "user", "assistant")


QWEN = ChatStyle(
    specials=(PAD, IM_START, IM_END, *VISION_TOKENS, UNK),
    pad=PAD,
    eos=IM_END,
    template=CHAT_TEMPLATE,
)
GEMMA = ChatStyle(
    specials=("<pad>", "<eos>", "<bos>", UNK, "<start_of_turn>", "<end_of_turn>",
              "<start_of_image>", "<end_of_image>", "<image_soft_token>"),
    pad="<pad>", eos="<eos>", bos="<bos>", template=GEMMA_TEMPLATE,
    named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
           "image_token": "<image_soft_token>"},
    words=("system", "user", "model"),
)  # fmt: skip

# SmolVLM's (Idefics3's) chat conventions: "User:" / "Assistant:" turns ended by <end_of_utterance>,
# which is also eos; an image is <image>, which the processor expands between
# <fake_token_around_image> marks (the tokenizer lower-cases, so the role words are lower case here)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
SMOLVLM = ChatStyle(
    specials=("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", UNK,
              "<fake_token_around_image>", "<image>", "<global-img>"),
    pad="<|endoftext|>", eos="<end_of_utterance>", bos="<|im_start|>", template=SMOLVLM_TEMPLATE,
    words=("system", "user", "assistant"),
)  # fmt: skip


def _alphabet() -> list[str]:
    """Printable lower-case ASCII plus newline: any such text encodes without `<unk>`."""
    return [chr(c) for c in range(32, 127) if not chr(c).isupper()] + ["\n"]


def train_chat_tokenizer(
    corpus: Sequence[str], *, extra_special_tokens: Sequence[str] = (), style: ChatStyle = QWEN
) -> PreTrainedTokenizerFast:
    """Train a lower-casing BPE on `corpus` and wrap it with `style`'s specials and chat template.

    BPE (rather than word-level) so unseen words still encode from characters; corpus words
    end up as single tokens. `<think>`/`</think>` are single, non-special tokens so that
    decoding with `skip_special_tokens=True` keeps the reflection format visible.
    """
    specials = [*style.specials, *extra_special_tokens]
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
    tok.train_from_iterator([*corpus, *(" " + t for t in corpus), *style.words], trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        pad_token=style.pad,
        eos_token=style.eos,
        bos_token=style.bos,
        additional_special_tokens=[t for t in specials if t not in (style.pad, UNK)],
        **style.named,
        chat_template=style.template,
        clean_up_tokenization_spaces=False,
    )
