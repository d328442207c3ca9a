"""HFReflector on tiny real VLMs: parsing, sampling, behaviour-vs-recomputed log-probs, LoRA, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from r3rl.models.reflector import REFLECTION_PROMPT, STOP, HFReflector, parse_reflection, sft_loss
from r3rl.models.tokenizer import train_chat_tokenizer
from r3rl.shapes.tiny_reflector import build_tiny_reflector

CORPUS = ["<think>see red</think> make the red square blue", f"<think>see blue</think> {STOP}"]
RED, BLUE = Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 220))
# prompts of different lengths, so rows are really left-padded
PROMPTS = [
    "a blue square",
    "two green circles left of a red triangle",
    "a blue square",
    "a red circle",
]
IMAGES = [RED, BLUE, BLUE, RED]


@pytest.fixture(scope="module")
def reflector() -> HFReflector:
    return build_tiny_reflector(CORPUS, 32, seed=0)


def _ids(reflector: HFReflector, *texts: str) -> list[list[int]]:
    """Completions as token ids of plain words (arbitrary ids could be image placeholders)."""
    return [reflector.tokenizer(t, add_special_tokens=False).input_ids for t in texts]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>sees red</think> make the square blue", ("make the square blue", True)),
        ("\n<think>sees red</think>  make it blue \n", ("make it blue", True)),
        ("<think>fine</think> No further edit needed.", (None, True)),
        ("<think>fine</think>NO FURTHER EDIT NEEDED!!", (None, True)),
        ("make the square blue", (None, False)),  # no tag: stop
        ("<think>sees red</think>   ", (None, False)),  # empty instruction: stop
        ("<think></think> make it blue", ("make it blue", False)),  # empty reasoning
        ("<think>a</think> b </think> make it blue", ("make it blue", False)),  # last tag wins
        ("<think>a</think><think>b</think> make it blue", ("make it blue", False)),
        ("I think <think>a</think> make it blue", ("make it blue", False)),  # not at the start
        ("<think>a make it blue", (None, False)),
    ],
)
def test_parse_reflection(text, expected):
    assert parse_reflection(text) == expected


def test_reflect_returns_well_formed_reflections(reflector):
    out = reflector.reflect(
        PROMPTS, IMAGES, temperature=0.9, top_k=5, top_p=1.0, max_new_tokens=12, seed=0
    )
    assert len(out) == len(PROMPTS)
    for r in out:
        assert 1 <= len(r.token_ids) == len(r.logprobs) <= 12
        assert all(math.isfinite(lp) and lp <= 0.0 for lp in r.logprobs)
        # a stop token may only be the last token, and the text is what precedes it
        assert not set(r.token_ids[:-1]) & set(reflector.stop_ids)
        body = r.token_ids[:-1] if r.token_ids[-1] in reflector.stop_ids else r.token_ids
        assert r.text == reflector.tokenizer.decode(body, skip_special_tokens=False)
        assert (r.instruction, r.format_ok) == parse_reflection(r.text)


def test_reflect_is_reproducible_with_a_seed(reflector):
    kw = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 10}
    a = reflector.reflect(PROMPTS, IMAGES, seed=3, **kw)
    b = reflector.reflect(PROMPTS, IMAGES, seed=3, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.9, 5, 1.0), (0.7, 0, 0.8), (0.0, 0, 1.0)]
)
def test_behaviour_logprobs_equal_recomputed(reflector, temperature, top_k, top_p):
    """The ratio starts at 1: generate's log-probs == one teacher-forced forward (R3's bug)."""
    kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    out = reflector.reflect(PROMPTS, IMAGES, max_new_tokens=12, seed=1, **kw)
    logps, mask, entropy = reflector.completion_logprobs(
        PROMPTS, IMAGES, [r.token_ids for r in out], with_grad=False, **kw
    )
    for i, r in enumerate(out):
        assert mask[i].sum().item() == len(r.token_ids)
        torch.testing.assert_close(
            logps[i, : len(r.token_ids)], torch.tensor(r.logprobs), atol=1e-4, rtol=0
        )
    assert (logps[~mask] == 0).all() and (entropy[~mask] == 0).all()
    assert (entropy[mask] >= 0).all()


def test_checkpoint_generation_defaults_do_not_change_the_sampled_distribution():
    """A checkpoint's own repetition penalty would make behaviour log-probs unreproducible."""
    reflector = build_tiny_reflector(CORPUS, 32, seed=0)
    reflector.model.generation_config.repetition_penalty = 1.5
    kw = {"temperature": 0.9, "top_k": 5, "top_p": 1.0}
    out = reflector.reflect(PROMPTS, IMAGES, max_new_tokens=12, seed=2, **kw)
    logps, _, _ = reflector.completion_logprobs(
        PROMPTS, IMAGES, [r.token_ids for r in out], with_grad=False, **kw
    )
    for i, r in enumerate(out):
        torch.testing.assert_close(
            logps[i, : len(r.token_ids)], torch.tensor(r.logprobs), atol=1e-4, rtol=0
        )


def test_image_placeholders_are_never_sampled():
    """With every logit equal, sampling is uniform over the vocabulary minus the 2 placeholders."""
    reflector = build_tiny_reflector(CORPUS, 32, seed=0)
    with torch.no_grad():
        reflector.model.lm_head.weight.zero_()
    vocab = reflector.model.config.text_config.vocab_size
    placeholders = set(
        reflector.tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    )
    out = reflector.reflect(
        PROMPTS * 2, IMAGES * 2, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=32, seed=0
    )
    assert not placeholders & {t for r in out for t in r.token_ids}
    for r in out:
        torch.testing.assert_close(
            torch.tensor(r.logprobs), torch.full((len(r.logprobs),), -math.log(vocab - 2))
        )
    logps, mask, _ = reflector.completion_logprobs(
        PROMPTS * 2,
        IMAGES * 2,
        [r.token_ids for r in out],
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        with_grad=False,
    )
    torch.testing.assert_close(logps[mask], torch.full((int(mask.sum()),), -math.log(vocab - 2)))


def test_completion_logprobs_carry_gradients(reflector):
    logps, mask, _ = reflector.completion_logprobs(
        PROMPTS[:2],
        IMAGES[:2],
        _ids(reflector, "see red square", " blue"),
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )
    assert logps.shape == mask.shape == (2, 3)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    logps.sum().backward()
    grads = [p.grad for p in reflector.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    reflector.model.zero_grad(set_to_none=True)


def test_disable_adapter_gives_the_base_policy():
    reflector = build_tiny_reflector(CORPUS, 32, seed=0)
    completions = _ids(reflector, "make the red square", "see blue", "no further edit", "red")
    kw = {
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "with_grad": False,
    }  # unfiltered: these tokens weren't sampled
    base, mask, _ = reflector.completion_logprobs(PROMPTS, IMAGES, completions, **kw)
    lora = HFReflector(
        get_peft_model(reflector.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
        reflector.processor,
    )
    with torch.no_grad():  # a trained adapter: LoRA's B starts at zero, which would prove nothing
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    adapted, _, _ = lora.completion_logprobs(PROMPTS, IMAGES, completions, **kw)
    ref, _, _ = lora.completion_logprobs(PROMPTS, IMAGES, completions, disable_adapter=True, **kw)
    assert (adapted[mask] - base[mask]).abs().max() > 1e-2
    torch.testing.assert_close(ref, base, atol=1e-5, rtol=0)
    assert all("lora_" in n for n, p in lora.model.named_parameters() if p.requires_grad)


def test_disable_adapter_without_lora_is_an_error(reflector):
    with pytest.raises(ValueError, match="frozen_copy"):
        reflector.completion_logprobs(
            PROMPTS[:1],
            IMAGES[:1],
            _ids(reflector, "red"),
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            disable_adapter=True,
        )


def test_frozen_copy_is_a_detached_reference(reflector):
    ref = reflector.frozen_copy()
    assert ref.trainable_parameters() == []
    assert reflector.trainable_parameters()  # the original is untouched
    with torch.no_grad():
        next(reflector.model.parameters()).add_(1.0)
    try:
        assert not torch.equal(next(ref.model.parameters()), next(reflector.model.parameters()))
    finally:
        with torch.no_grad():
            next(reflector.model.parameters()).sub_(1.0)


def _logits(reflector: HFReflector) -> torch.Tensor:
    with torch.no_grad():
        completions = _ids(reflector, "make the red square", "see blue", "red", "no further")
        return reflector.completion_logits(PROMPTS, IMAGES, completions)[0]


def test_save_load_round_trip_gives_identical_logits(reflector, tmp_path):
    reflector.save_pretrained(tmp_path)
    loaded = HFReflector.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(reflector), atol=0, rtol=0)
    assert loaded.processor.image_processor.patch_size == 4


def test_lora_from_pretrained_saves_and_resumes_the_adapter(reflector, tmp_path):
    reflector.save_pretrained(tmp_path / "base")
    lora = HFReflector.from_pretrained(
        tmp_path / "base", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}
    )
    assert isinstance(lora.model, PeftModel)
    with torch.no_grad():
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # the adapter only
    resumed = HFReflector.from_pretrained(tmp_path / "adapter")
    assert resumed.trainable_parameters()
    torch.testing.assert_close(_logits(resumed), _logits(lora), atol=1e-6, rtol=0)


@pytest.mark.parametrize("lora", [None, {"r": 4, "target_modules": ["q_proj", "v_proj"]}])
def test_gradient_checkpointing_keeps_sampling_and_scoring_exact(reflector, tmp_path, lora):
    reflector.save_pretrained(tmp_path)
    ckpt = HFReflector.from_pretrained(tmp_path, gradient_checkpointing=True, lora=lora)
    ckpt.model.train()
    kw = {"temperature": 0.9, "top_k": 5, "top_p": 1.0}
    out = ckpt.reflect(PROMPTS, IMAGES, max_new_tokens=8, seed=0, **kw)
    assert ckpt.model.training  # reflect switches to eval (KV cache) and back
    logps, mask, _ = ckpt.completion_logprobs(PROMPTS, IMAGES, [r.token_ids for r in out], **kw)
    for i, r in enumerate(out):
        torch.testing.assert_close(
            logps[i, : len(r.token_ids)].detach(), torch.tensor(r.logprobs), atol=1e-4, rtol=0
        )
    logps[mask].sum().backward()
    assert all(p.grad is not None for p in ckpt.trainable_parameters())


def test_sft_loss_is_cross_entropy_on_the_target_tokens(reflector):
    targets = ["<think>see red</think> make the red square blue", "<think>x</think> y"]
    loss = sft_loss(reflector, PROMPTS[:2], IMAGES[:2], targets)
    completions = [reflector.encode_completion(t) for t in targets]
    assert completions[0][-1] == reflector.tokenizer.convert_tokens_to_ids("<|im_end|>")
    logps, mask, _ = reflector.completion_logprobs(
        PROMPTS[:2], IMAGES[:2], completions, temperature=1.0, top_k=0, top_p=1.0, with_grad=False
    )
    # token mean over the whole batch, end-of-turn token included
    expected = -logps[mask].sum() / (len(completions[0]) + len(completions[1]))
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- a second VLM family
LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_llava() -> HFReflector:
    """LLaVA with a SigLIP tower and a Qwen2 LM: different vision tower, projector and processor."""
    tok = train_chat_tokenizer([*CORPUS, REFLECTION_PROMPT], extra_special_tokens=("<image>",))
    tok.chat_template = LLAVA_TEMPLATE
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="full",
        image_token="<image>",
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tok),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    return HFReflector(LlavaForConditionalGeneration(config), processor)


def test_a_llava_family_model_works_through_the_same_adapter(tmp_path):
    _tiny_llava().save_pretrained(tmp_path)
    reflector = HFReflector.from_pretrained(tmp_path)
    assert isinstance(reflector.model, LlavaForConditionalGeneration)
    kw = {"temperature": 0.9, "top_k": 5, "top_p": 1.0}
    out = reflector.reflect(PROMPTS, IMAGES, max_new_tokens=10, seed=0, **kw)
    logps, _, _ = reflector.completion_logprobs(
        PROMPTS, IMAGES, [r.token_ids for r in out], with_grad=False, **kw
    )
    for i, r in enumerate(out):
        torch.testing.assert_close(
            logps[i, : len(r.token_ids)], torch.tensor(r.logprobs), atol=1e-4, rtol=0
        )
    loss = sft_loss(reflector, PROMPTS[:2], IMAGES[:2], CORPUS)
    loss.backward()
    assert math.isfinite(loss.item())
