"""The reflector adapter: any chat VLM from `transformers` seen as a text policy over images.

A reflector reads the target prompt and the current image and writes
`<think>reasoning</think> instruction` (design.md §4). GRPO needs two things from it:
sampled reflections with the behaviour log-probs of the distribution actually sampled, and
the same log-probs recomputed (with grad) by one teacher-forced forward. Both go through
`r3rl.algos.grpo.token_logprobs` semantics, so ratios start at exactly 1 (R3's bug was
behaviour log-probs taken at temperature 1 without the top-p filter used for sampling).
Nothing here is specific to a model family: whatever `AutoModelForImageTextToText` and
`AutoProcessor` load works (tested: Qwen2.5-VL, Qwen3-VL, Gemma 3, SmolVLM / Idefics3, LLaVA).
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    ProcessorMixin,
)
from transformers.models.auto.processing_auto import processor_class_from_name

from r3rl.algos.grpo import token_logprobs
from r3rl.models.placement import execution_device
from r3rl.modes.region import split_box

REFLECTION_PROMPT = (
    "The target description is: {prompt}. How should the provided image be edited to match it? "
    "Give one concrete instruction, or answer: no further edit needed."
)
STOP = "no further edit needed"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# tensors the processor returns one value per prompt token; completions extend them
_TOKEN_ALIGNED = ("attention_mask", "mm_token_type_ids", "token_type_ids")
# generation settings that would reshape the sampled distribution if a checkpoint's own
# generation_config set them (Qwen2.5-VL ships repetition_penalty=1.05): pinned to neutral,
# the first for every decode, the rest (warpers) where sampling applies them
_NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
_NEUTRAL_WARPERS = {"typical_p": 1.0, "min_p": 0.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


# LoRA default: the attention and MLP projections of the language model (vision tower, lm_head
# untouched)
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_kwargs(
    r: int, alpha: int, dropout: float = 0.0, target_modules: list[str] | None = None
) -> dict:
    """A recipe's `reflector.lora` section as peft `LoraConfig` keyword arguments (`target_modules`
    None = the language model's projections, resolved by `with_lora` once the model is loaded)."""
    return {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": target_modules}


def language_model_targets(model: torch.nn.Module) -> str:
    """A peft `target_modules` regex for `LM_PROJECTIONS` inside the model's language model only,
    wherever the family keeps it (transformers' `get_decoder`): Qwen-VL's and Gemma 3's
    `language_model`, Idefics3 / SmolVLM's `text_model` (whose vision tower has q/k/v_proj too),
    a causal LM's `model`."""
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    inside = re.escape(prefix + ".") if prefix else ""
    return rf"{inside}.*\.({'|'.join(LM_PROJECTIONS)})"


def with_lora(model: torch.nn.Module, lora: dict) -> PeftModel:
    """`model` with a fresh trainable adapter from `lora_kwargs` settings."""
    targets = lora.get("target_modules") or language_model_targets(model)
    return get_peft_model(model, LoraConfig(**{**lora, "target_modules": targets}))


def _words(text: str) -> str:
    """Lower-case, punctuation-free, single-spaced: how instructions are compared to STOP."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _format_ok(text: str) -> bool:
    """Exactly one think block, at the start, with non-empty reasoning and a non-empty
    instruction after it."""
    head = text.lstrip()
    if (
        not head.startswith(THINK_OPEN)
        or text.count(THINK_OPEN) != 1
        or text.count(THINK_CLOSE) != 1
    ):
        return False
    reasoning, instruction = head[len(THINK_OPEN) :].split(THINK_CLOSE)
    return bool(reasoning.strip()) and bool(instruction.strip())


def parse_reflection(text: str) -> tuple[str | None, bool]:
    """(instruction or None for "stop", format_ok) of a reflection, as R3 reads it.

    The instruction is the text after the last `</think>`; a missing tag, an empty
    instruction and "no further edit needed" all mean stop. format_ok holds only for the
    exact shape `<think>reasoning</think> instruction`. The instruction may name the region
    it applies to, `<box>x0 y0 x1 y1</box>` in canvas fractions; the box stays in the
    instruction (region mode reads it) and a box alone or with the stop phrase is a stop.
    """
    if THINK_CLOSE not in text:
        return None, False
    instruction = text.rsplit(THINK_CLOSE, 1)[1].strip()
    format_ok = _format_ok(text)
    words = _words(split_box(instruction)[0])
    if not words or words == _words(STOP):
        return None, format_ok
    return instruction, format_ok


@dataclass
class Reflection:
    """One sampled reflection; token_ids/logprobs cover the real completion tokens (incl. the
    stop token)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    instruction: str | None
    format_ok: bool


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every dropout of an RL policy (TRL's `disable_dropout`): its updates must score the
    distribution it sampled from, so an on-policy ratio is exactly 1. Covers dropout modules
    (LoRA's included) and the attention dropout HF attention layers apply functionally in train
    mode. The policy can then run its loss in train mode, where gradient checkpointing works."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def _distribution(temperature: float, top_k: int, top_p: float) -> tuple[float, int, float]:
    """The sampling settings whose log-probs are reported; greedy (temperature 0) reports the
    plain model."""
    return (temperature, top_k, top_p) if temperature > 0 else (1.0, 0, 1.0)


def image_only_processor(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`cls` without its video processor, for machines without torchvision.

    Qwen-VL processors insist on a video processor, which needs torchvision; the CPU build of
    torch used here has no matching torchvision. Images go through the real class unchanged.
    The subclass keeps `cls`'s name and module so what it saves reads as an ordinary `cls`
    checkpoint (a diffusers pipeline holding it records it as a `transformers` component).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    return type(
        cls.__name__,
        (cls,),
        {"__init__": __init__, "__doc__": cls.__doc__, "__module__": cls.__module__},
    )


def load_processor(path: str | Path, *, trust_remote_code: bool = False) -> ProcessorMixin:
    """AutoProcessor; a processor that cannot get its video processor (no torchvision, or none
    saved) is loaded image-only instead."""
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError):
        config = Path(path) / "processor_config.json"
        if not config.exists():
            raise
        cls = processor_class_from_name(json.loads(config.read_text()).get("processor_class", ""))
        if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
            raise
        return image_only_processor(cls).from_pretrained(path)


def end_of_turn_id(processor: ProcessorMixin) -> int:
    """The token the chat template closes an assistant turn with (Qwen's <|im_end|>, Gemma's
    <end_of_turn>), which is often not eos; eos where the template writes no special token there."""
    tokenizer, mark = processor.tokenizer, "reflection"
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "x"}]},
        {"role": "assistant", "content": [{"type": "text", "text": mark}]},
    ]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    after = tokenizer(rendered.rsplit(mark, 1)[-1], add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return next((t for t in after if t in special), tokenizer.eos_token_id)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for generation (KV cache on even with gradient checkpointing), then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed HF sampling (which draws from the global RNG) without leaking into the caller's RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class HFReflector:
    """A transformers chat VLM (optionally a peft LoRA model) plus its processor, as a GRPO text
    policy."""

    def __init__(self, model: torch.nn.Module, processor: ProcessorMixin) -> None:
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.end_id = end_of_turn_id(processor)
        gen_eos = model.generation_config.eos_token_id
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.stop_ids = sorted({self.end_id, self.tokenizer.eos_token_id, *gen_eos} - {None})
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.end_id if pad is None else pad
        # image/video placeholders are banned from completions: re-scored, they would be taken
        # for image slots (and the forward would fail). The processor's may differ from the
        # model's (Gemma 3 writes <start_of_image>, the model fills <image_soft_token>): both.
        vocab = self.tokenizer.get_vocab()
        placeholders = [getattr(processor, name, None) for name in ("image_token", "video_token")]
        slots = [getattr(model.config, name, None) for name in ("image_token_id", "video_token_id")]
        self.banned_ids = sorted(
            {vocab[t] for t in placeholders if t in vocab} | {i for i in slots if i is not None}
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
    ) -> HFReflector:
        """Load a model folder or a saved LoRA adapter folder (its base is read from
        adapter_config.json).

        `lora` (LoraConfig kwargs) adds a fresh adapter to a full model; a saved adapter is
        resumed as it is (trainable).
        """
        path = Path(path)
        is_adapter = (path / "adapter_config.json").exists()
        base = PeftConfig.from_pretrained(path).base_model_name_or_path if is_adapter else path
        kwargs = {} if dtype is None else {"dtype": dtype}
        model = AutoModelForImageTextToText.from_pretrained(
            base, trust_remote_code=trust_remote_code, **kwargs
        )
        if is_adapter:
            model = PeftModel.from_pretrained(model, path, is_trainable=True)
        elif lora is not None:
            model = with_lora(model, lora)
        model.to(device)
        disable_dropout(model)
        if gradient_checkpointing:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        return cls(model, load_processor(path, trust_remote_code=trust_remote_code))

    def save_pretrained(self, path: str | Path) -> None:
        """Model (or just the adapter, for a peft model) and processor, loadable by
        `from_pretrained`."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    def frozen_copy(self) -> HFReflector:
        """A deep-copied, grad-free reference policy (for full fine-tuning; LoRA uses
        `disable_adapter`)."""
        model = copy.deepcopy(self.model).requires_grad_(False).eval()
        return HFReflector(model, self.processor)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return execution_device(self.model)  # an offloaded reference's parameters are placeholders

    # ------------------------------------------------------------------ inputs
    def prompt_inputs(
        self, prompts: Sequence[str], images: Sequence[Image.Image] | None
    ) -> dict[str, torch.Tensor]:
        """Processor outputs for the user turn (image + REFLECTION_PROMPT), left-padded for
        generation. `images` None: a text-only turn whose user message is each prompt as it is
        (the planning turn of `rollout.reason`, `r3rl.reason`)."""
        if images is None:
            return self._text_inputs(prompts)
        messages = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": REFLECTION_PROMPT.format(prompt=p)},
                    ],
                }
            ]
            for p in prompts
        ]
        texts = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(
            text=texts,
            images=[[im] for im in images],
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in inputs.items() if torch.is_tensor(v)}

    def _text_inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """A text-only user turn per text, left-padded for generation."""
        messages = [[{"role": "user", "content": [{"type": "text", "text": t}]}] for t in texts]
        rendered = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(
            text=rendered, padding=True, padding_side="left", return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in inputs.items() if torch.is_tensor(v)}

    def encode_completion(self, text: str) -> list[int]:
        """Token ids of an assistant answer followed by the end-of-turn token (an SFT target)."""
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.end_id]

    # ------------------------------------------------------------------ sampling
    def _generation_config(
        self, temperature: float, top_k: int, top_p: float, max_new_tokens: int
    ) -> GenerationConfig:
        sampling = {"do_sample": False}
        if temperature > 0:
            sampling = dict(
                do_sample=True,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                **_NEUTRAL_WARPERS,
            )
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            suppress_tokens=self.banned_ids or None,
            output_scores=True,
            return_dict_in_generate=True,
            **sampling,
            **_NEUTRAL,
        )

    def _reflection(self, ids: list[int], logps: list[float]) -> Reflection:
        """Cut a generated row after its first stop token and parse it."""
        stops = [i for i, t in enumerate(ids) if t in self.stop_ids]
        n = stops[0] + 1 if stops else len(ids)
        body = ids[: n - 1] if stops else ids
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        instruction, format_ok = parse_reflection(text)
        return Reflection(text, ids[:n], logps[:n], instruction, format_ok)

    @torch.no_grad()
    def reflect(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image] | None,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[Reflection]:
        """Sample one reflection per (prompt, image); temperature 0 is greedy. `images` None:
        text-only turns (see `prompt_inputs`).

        Behaviour log-probs come from generate's processed scores, i.e. the distribution the
        tokens were actually drawn from (temperature, top-k, top-p applied).
        """
        inputs = self.prompt_inputs(prompts, images)
        config = self._generation_config(temperature, top_k, top_p, max_new_tokens)
        with _eval_mode(self.model), _seeded(seed, self.device):
            out = self.model.generate(**inputs, generation_config=config)
        new = out.sequences[:, inputs["input_ids"].shape[1] :]
        logps = torch.stack(
            [
                s.float().log_softmax(-1).gather(1, new[:, i : i + 1])[:, 0]
                for i, s in enumerate(out.scores)
            ],
            1,
        )
        return [self._reflection(ids, lp) for ids, lp in zip(new.tolist(), logps.tolist())]

    # ------------------------------------------------------------------ scoring
    def completion_logits(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image] | None,
        completions: Sequence[Sequence[int]],
        *,
        disable_adapter: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced logits (B, T, V) predicting each completion token, its ids (B, T), mask
        (B, T).

        Prompts stay left-padded as in `reflect`, completions are right-padded after them, so
        positions (incl. multimodal RoPE) are exactly the ones generation used. Banned
        placeholder tokens get -inf, as generation's suppression gave them.
        """
        b, t = len(completions), max(len(c) for c in completions)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        mask = torch.zeros(b, t, dtype=torch.bool)
        for i, c in enumerate(completions):
            ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c, dtype=torch.long), True
        ids, mask = ids.to(self.device), mask.to(self.device)
        inputs = self.prompt_inputs(prompts, images)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], 1)
        for key in _TOKEN_ALIGNED:
            if key in inputs:
                tail = mask if key == "attention_mask" else torch.zeros_like(ids)
                inputs[key] = torch.cat([inputs[key], tail.to(inputs[key].dtype)], 1)
        if disable_adapter and not isinstance(self.model, PeftModel):
            raise ValueError(
                "disable_adapter needs a peft LoRA model; for full fine-tuning use frozen_copy()"
            )
        with self.model.disable_adapter() if disable_adapter else nullcontext():
            logits = self.model(**inputs, use_cache=False, logits_to_keep=t + 1).logits
        banned = torch.tensor(self.banned_ids, dtype=torch.long, device=logits.device)
        return logits[:, :-1].float().index_fill(-1, banned, float("-inf")), ids, mask

    def completion_logprobs(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image] | None,
        completions: Sequence[Sequence[int]],
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        with_grad: bool = True,
        disable_adapter: bool = False,
        with_unfiltered: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """(logps, mask, entropy), each (B, T), of `completions` under the sampling distribution.

        Padding positions hold 0 (not -inf), so masked sums stay finite. `disable_adapter`
        scores with the LoRA-free base: the reference policy of a LoRA run at no extra memory.
        `with_unfiltered` appends the unfiltered log-softmax (temperature only, no top-k/top-p) of
        the same logits: what the KL to the (unfiltered) reference compares, as TRL does.
        """
        # a forward with grad runs in train mode, where HF layers checkpoint activations (dropout is
        # zeroed at load, disable_dropout); the model's mode is restored after
        was_training = self.model.training
        self.model.train(with_grad)
        try:
            with torch.enable_grad() if with_grad else torch.no_grad():
                logits, ids, mask = self.completion_logits(
                    prompts, images, completions, disable_adapter=disable_adapter
                )
        finally:
            self.model.train(was_training)
        with torch.enable_grad() if with_grad else torch.no_grad():
            temperature, top_k, top_p = _distribution(temperature, top_k, top_p)
            logps, entropy = token_logprobs(
                logits, ids, temperature=temperature, top_k=top_k, top_p=top_p
            )
            out = (logps.masked_fill(~mask, 0.0), mask, entropy.masked_fill(~mask, 0.0))
            if with_unfiltered:
                full, _ = token_logprobs(logits, ids, temperature=temperature, top_k=0, top_p=1.0)
                out = (*out, full.masked_fill(~mask, 0.0))
            return out


def sft_loss(
    reflector: HFReflector,
    prompts: Sequence[str],
    images: Sequence[Image.Image] | None,
    targets: Sequence[str],
) -> torch.Tensor:
    """Token-mean cross-entropy of the assistant targets (+ end-of-turn) given image and prompt;
    `images` None: text-only turns whose user message is the prompt as it is (planning)."""
    completions = [reflector.encode_completion(t) for t in targets]
    logits, ids, mask = reflector.completion_logits(prompts, images, completions)
    return F.cross_entropy(logits[mask], ids[mask])
