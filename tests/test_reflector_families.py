"""Reflector families through the recipe path: a tiny random-weight checkpoint of each family is
saved, loaded by `HFReflector.from_pretrained` with the recipe's LoRA and gradient checkpointing,
sampled, trained one GRPO step, and its adapter reloaded with plain peft/transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from r3rl.algos.grpo import grpo_loss
from r3rl.config import LoRAConfig
from r3rl.models.reflector import STOP, HFReflector, lora_kwargs
from r3rl.models.tiny_vlm import FAMILIES, build_tiny_vlm

CORPUS = ["<think>see red</think> make the red square blue", f"<think>see blue</think> {STOP}"]
RED, BLUE = Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 220))
PROMPTS = [
    "a blue square",
    "two green circles left of a red triangle",
    "a red circle",
    "a blue square",
]
IMAGES = [RED, BLUE, RED, BLUE]  # prompts of different lengths: rows really are left-padded
SAMPLING = {"temperature": 0.9, "top_k": 5, "top_p": 1.0}
# the token that ends an assistant turn in each family's chat template (Gemma's eos is <eos>)
END_OF_TURN = {"qwen2_5_vl": "<|im_end|>", "qwen3_vl": "<|im_end|>", "gemma3": "<end_of_turn>",
               "idefics3": "<end_of_utterance>"}
CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
           "gemma3": "Gemma3ForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration"}  # fmt: skip
# where each family keeps its language model (SmolVLM's vision tower has q/k/v_proj too)
LANGUAGE_MODEL = {"qwen2_5_vl": ".language_model.", "qwen3_vl": ".language_model.", "gemma3": ".language_model.",
                  "idefics3": ".text_model."}  # fmt: skip


@pytest.fixture(scope="module", params=FAMILIES)
def base(request, tmp_path_factory, one_thread) -> tuple[str, Path]:
    """(family, folder of its saved tiny checkpoint)."""
    path = tmp_path_factory.mktemp(request.param)
    build_tiny_vlm(request.param, CORPUS, 32).save_pretrained(path)
    return request.param, path


def _load(path: Path, *, gradient_checkpointing: bool = True) -> HFReflector:
    """As `r3rl train` loads a recipe's reflector: the recipe's `lora:` section mapped to peft."""
    torch.manual_seed(0)  # the same LoRA init for every load
    lora = lora_kwargs(**LoRAConfig(r=4, alpha=8).model_dump())
    return HFReflector.from_pretrained(
        path, lora=lora, gradient_checkpointing=gradient_checkpointing
    )


def _sample(reflector: HFReflector, seed: int = 0):
    return reflector.reflect(PROMPTS, IMAGES, max_new_tokens=10, seed=seed, **SAMPLING)


def test_recipe_path_loads_the_family_with_lora_on_the_language_model(base):
    family, path = base
    reflector = _load(path)
    assert type(reflector.model.get_base_model()).__name__ == CLASSES[family]
    trainable = [n for n, p in reflector.model.named_parameters() if p.requires_grad]
    layers = reflector.model.get_base_model().config.get_text_config().num_hidden_layers
    # the default targets: 7 projections per language-model layer, 2 LoRA matrices each; no vision tower
    assert len(trainable) == layers * 7 * 2
    assert all("lora_" in n and LANGUAGE_MODEL[family] in n for n in trainable)
    assert reflector.model.is_activation_checkpointing
    end = reflector.tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    assert reflector.end_id == end and end in reflector.stop_ids
    assert reflector.encode_completion("<think>a</think> b")[-1] == end  # SFT targets end the turn


def test_sampled_logprobs_equal_recomputed(base):
    """The GRPO ratio starts at exactly 1: generate's log-probs == one teacher-forced forward."""
    reflector = _load(base[1])
    reflector.model.train()
    out = _sample(reflector)
    assert reflector.model.training  # sampling switched to eval (KV cache) and back
    logps, mask, _ = reflector.completion_logprobs(
        PROMPTS, IMAGES, [r.token_ids for r in out], with_grad=False, **SAMPLING
    )
    for i, r in enumerate(out):
        assert mask[i].sum() == len(r.token_ids) == len(r.logprobs) >= 1
        assert not set(r.token_ids) & set(reflector.banned_ids)  # no image placeholders
        assert not set(r.token_ids[:-1]) & set(reflector.stop_ids)
        assert all(math.isfinite(lp) and lp <= 0 for lp in r.logprobs)
        torch.testing.assert_close(
            logps[i, : len(r.token_ids)], torch.tensor(r.logprobs), atol=1e-4, rtol=0
        )


def _grpo(
    reflector: HFReflector, out, advantages: torch.Tensor, *, with_grad: bool = True
) -> torch.Tensor:
    logps, mask, _ = reflector.completion_logprobs(
        PROMPTS, IMAGES, [r.token_ids for r in out], with_grad=with_grad, **SAMPLING
    )
    old = torch.zeros_like(logps)
    for i, r in enumerate(out):
        old[i, : len(r.logprobs)] = torch.tensor(r.logprobs)
    return grpo_loss(logps, old, advantages, mask)[0]


def test_one_grpo_step_trains_only_the_lora_weights_with_checkpointing(base, monkeypatch):
    reflector = _load(base[1])
    reflector.model.train()
    out = _sample(reflector)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    before = {n: p.detach().clone() for n, p in reflector.model.named_parameters()}
    loss = _grpo(reflector, out, adv)
    # checkpointed: what runs inside a language-model layer runs again in backward (the recompute)
    mlp = reflector.model.get_base_model().get_decoder().layers[0].mlp
    calls, forward = [], mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    _grpo(reflector, out, adv).backward()
    monkeypatch.undo()
    assert len(calls) == 2
    reflector.model.zero_grad(set_to_none=True)
    loss.backward()
    plain = _load(base[1], gradient_checkpointing=False)
    plain.model.train()
    _grpo(plain, out, adv).backward()
    grads = dict(plain.model.named_parameters())
    for name, p in reflector.model.named_parameters():
        if p.requires_grad:  # checkpointing changes memory, not gradients
            torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5)
    opt = torch.optim.AdamW(
        reflector.trainable_parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0
    )
    opt.step()
    for name, p in reflector.model.named_parameters():
        if "lora_B" in name:  # B starts at 0 (A gets no gradient yet): every B moved
            assert not torch.equal(p, before[name]), name
        elif "lora_" not in name:
            assert torch.equal(p, before[name]), name
    assert _grpo(reflector, out, adv, with_grad=False) < loss.detach()  # the step lowered the loss


def test_saved_adapter_reloads_with_plain_peft_and_identical_logits(base, tmp_path):
    path = base[1]
    reflector = _load(path)
    with torch.no_grad():  # a trained adapter: B = 0 would make any reload look right
        for name, p in reflector.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    reflector.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == path
    assert all("lora_" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    reloaded = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(path), tmp_path
    ).eval()
    reflector.model.eval()
    inputs = reflector.prompt_inputs(PROMPTS, IMAGES)
    with torch.no_grad():
        mine, theirs = reflector.model(**inputs).logits, reloaded(**inputs).logits
    torch.testing.assert_close(theirs, mine, atol=1e-6, rtol=0)
    with torch.no_grad(), reloaded.disable_adapter():
        assert (reloaded(**inputs).logits - mine).abs().max() > 1e-3  # the adapter matters
    # and r3rl resumes it as a trainable adapter with the same policy
    resumed = HFReflector.from_pretrained(tmp_path)
    assert resumed.trainable_parameters() and resumed.end_id == reflector.end_id
    with torch.no_grad():
        torch.testing.assert_close(resumed.model.eval()(**inputs).logits, mine, atol=1e-6, rtol=0)
