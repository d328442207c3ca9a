"""The locally trained chat tokenizer and the tiny Qwen2.5-VL shapes reflector (build + SFT)."""

from __future__ import annotations

import pytest
from PIL import Image

from r3rl.models.reflector import STOP, parse_reflection
from r3rl.models.tokenizer import train_chat_tokenizer
from r3rl.shapes.critique import corpus
from r3rl.shapes.tiny_reflector import build_tiny_reflector, sft_reflector

RED_TARGET = "<think>see red</think> make the red square blue"
BLUE_TARGET = f"<think>see blue</think> {STOP}"
RED, BLUE = Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 220))


@pytest.fixture(scope="module")
def shapes_tokenizer():
    return train_chat_tokenizer(corpus())


def test_tokenizer_round_trip_is_exact_on_the_shapes_corpus(shapes_tokenizer):
    tok = shapes_tokenizer
    texts = [*corpus(), "<think>odd words, Zebra!</think>  move it\nleft.", "</think> <think>"]
    for text in texts:
        decoded = tok.decode(tok(text, add_special_tokens=False).input_ids)
        assert decoded == text.lower()
        assert parse_reflection(decoded) == parse_reflection(text)


def test_tokenizer_keeps_special_tokens_whole_and_corpus_words_single(shapes_tokenizer):
    tok = shapes_tokenizer
    for special in [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<think>",
        "</think>",
    ]:
        assert len(tok(special, add_special_tokens=False).input_ids) == 1, special
    pieces = tok.convert_ids_to_tokens(
        tok(
            "<think>see red</think> move the red circle to the left.", add_special_tokens=False
        ).input_ids
    )
    assert pieces == [
        "<think>",
        "see",
        " red",
        "</think>",
        " move",
        " the",
        " red",
        " circle",
        " to",
        " the",
        " left",
        ".",
    ]
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    # the think tags survive skip_special_tokens, so logged reflections keep their format
    assert (
        tok.decode(tok("<think>a</think> b").input_ids, skip_special_tokens=True)
        == "<think>a</think> b"
    )


def test_tokenizer_chat_template_is_qwen_style_with_images(shapes_tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a red circle"}]}
    ]
    text = shapes_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a red circle<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("image_size", [32, 64])
def test_tiny_reflector_gives_16_visual_tokens_per_image(image_size):
    reflector = build_tiny_reflector([RED_TARGET, BLUE_TARGET], image_size)
    image_pad = reflector.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    big = Image.new("RGB", (96, 96), (0, 200, 0))  # any input size is resized to image_size
    inputs = reflector.prompt_inputs(["a red square", "a green circle"], [RED, big])
    assert (inputs["input_ids"] == image_pad).sum(1).tolist() == [16, 16]
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]  # 8x8 patches, merged 2x2
    text = reflector.model.config.text_config
    assert text.hidden_size == 128 and reflector.model.config.vision_config.depth == 2
    assert (
        sum(text.rope_parameters["mrope_section"]) * 2
        == text.hidden_size // text.num_attention_heads
    )


def test_build_rejects_an_image_size_the_patches_do_not_divide():
    with pytest.raises(ValueError, match="multiple of 8"):
        build_tiny_reflector([RED_TARGET], 36)


def test_sft_teaches_the_reflector_to_see_the_colour():
    """After a few SFT steps greedy reflection depends on the image alone (same prompt for both)."""
    reflector = build_tiny_reflector([RED_TARGET, BLUE_TARGET], 32, seed=0)
    examples = [("a blue square", RED, RED_TARGET), ("a blue square", BLUE, BLUE_TARGET)] * 4
    calls = []
    losses = sft_reflector(
        reflector,
        examples,
        steps=40,
        batch_size=8,
        lr=3e-3,
        seed=0,
        progress=lambda step, loss: calls.append(step),
    )
    assert len(losses) == 40 and calls == list(range(40))
    assert losses[-1] < 0.1 * losses[0]
    out = reflector.reflect(
        ["a blue square"] * 2, [RED, BLUE], temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=16
    )
    assert [r.text for r in out] == [RED_TARGET, BLUE_TARGET]
    assert [(r.instruction, r.format_ok) for r in out] == [
        ("make the red square blue", True),
        (None, True),
    ]
    assert [r.token_ids[-1] for r in out] == [reflector.end_id] * 2  # it learned to stop
