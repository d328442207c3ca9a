"""The default reflector / text-policy LoRA lands on the language model's projections only, wherever
the family keeps its language model: Qwen2.5-VL's `language_model`, Idefics3 / SmolVLM's
`text_model` (whose vision tower also has q/k/v_proj), a plain causal LM's `model`."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from r3rl.models.reflector import LM_PROJECTIONS, lora_kwargs, with_lora

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_LM = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1}


def _idefics3() -> torch.nn.Module:
    """SmolVLM's class: a SigLIP-style vision tower + a Llama text model named `text_model`."""
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    return Idefics3ForConditionalGeneration(Idefics3Config(text_config={**TINY_LM, "model_type": "llama"},
                                                           vision_config=vision, scale_factor=2))


def _qwen25_vl(tokenizer) -> torch.nn.Module:
    from r3rl.shapes.tiny_reflector import _config

    return Qwen2_5_VLForConditionalGeneration(_config(tokenizer, 32))


def _causal_lm() -> torch.nn.Module:
    return Qwen2ForCausalLM(Qwen2Config(**TINY_LM))


@pytest.mark.parametrize("family,language_model", [("idefics3", "model.text_model."),
                                                   ("qwen2_5_vl", "model.language_model."),
                                                   ("causal_lm", "model.")])
def test_default_lora_targets_every_language_model_projection_and_nothing_else(family, language_model, tokenizer):
    model = {"idefics3": _idefics3, "qwen2_5_vl": lambda: _qwen25_vl(tokenizer), "causal_lm": _causal_lm}[family]()
    expected = {n for n, m in model.named_modules()
                if n.startswith(language_model) and n.rsplit(".", 1)[-1] in LM_PROJECTIONS}
    assert expected
    peft_model = with_lora(model, lora_kwargs(r=2, alpha=4))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == expected
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_explicit_target_modules_win():
    peft_model = with_lora(_idefics3(), lora_kwargs(r=2, alpha=4, target_modules=["q_proj"]))
    adapted = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert any("vision_model" in n for n in adapted) and all(n.endswith("q_proj") for n in adapted)
