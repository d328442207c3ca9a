"""Recipes: YAML files plus dotted command-line overrides, validated into a typed `Config`.

Every section forbids unknown keys, so a typo fails before any work starts, with one line
that names the dotted key, the bad value and what was expected. Relative paths in a recipe
(prompt files, resume checkpoints, reward files) are relative to the working directory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from r3rl.errors import ConfigError, UserError, did_you_mean
from r3rl.rewards import check_reward_name

log = logging.getLogger(__name__)


class _Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, numbers may stand for strings."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=True)


def _existing_file(value: str | None) -> str | None:
    """Fail at load time on a path that does not exist, not hours into a run."""
    if value is not None and not Path(value).exists():
        raise PydanticCustomError("file_not_found", "file not found: {path}", {"path": value})
    return value


class DataConfig(_Section):
    """Prompt files; null means the shapes world's own split."""

    train_prompts: str | None = Field(
        None, description="JSONL prompt file for training (null = shapes-world train split)."
    )
    eval_prompts: str | None = Field(
        None, description="JSONL prompt file for evaluation (null = shapes-world eval split)."
    )
    num_eval_prompts: int | None = Field(
        48, gt=0, description="Evaluate on the first N eval prompts (null = all)."
    )
    prompt_field: str = Field(
        "prompt",
        min_length=1,
        description="Key of each prompt record that holds the prompt, copied into 'prompt' when "
        "another (R3's TIIF files have none: short_description, as R3 trains, or "
        "long_description).",
    )
    tag_field: str = Field(
        "tag",
        min_length=1,
        description="Key of each prompt record that holds its category for per-tag eval figures, "
        "copied into 'tag' when another (R3's TIIF files: type).",
    )

    _check_files = field_validator("train_prompts", "eval_prompts")(_existing_file)


class WorldConfig(_Section):
    """The embedded shapes world: image size and the short pretraining of its tiny models."""

    image_size: int = Field(32, gt=0, description="Side of the square images in pixels.")
    seed: int | None = Field(
        None,
        description="Seed of the world's pretraining (null = the run's seed): fix it to compare RL "
        "seeds, or methods, on one pretrained world.",
    )
    cache_dir: str | None = Field(
        None, description="Where pretrained tiny models are cached (null = default cache)."
    )
    pretrain_diffusion_steps: int = Field(
        1500, ge=0, description="Supervised flow-matching steps for the tiny generator/refiner."
    )
    pretrain_reflector_steps: int = Field(
        300, ge=0, description="SFT steps of the tiny reflector on checker-written critiques."
    )
    pretrain_batch_size: int = Field(
        32, gt=0, description="Batch size of flow-matching and SFT pretraining."
    )
    pretrain_pairs: int = Field(
        3000,
        gt=0,
        description="Rendered text-to-image pairs and edit triples encoded once for flow matching.",
    )
    pretrain_vae_steps: int = Field(800, ge=0, description="Reconstruction steps of the tiny VAE.")
    pretrain_vae_batch_size: int = Field(
        8, gt=0, description="Batch size of VAE pretraining (small is faster)."
    )
    reflector_sft_examples: int = Field(
        1500,
        gt=0,
        description="Checker-critiqued images (generated + rendered) the reflector is fine-tuned "
        "on.",
    )


_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
# the AdamW settings of every trained policy: the reflector's, the generator's and the refiner's
AdamBetas = Annotated[
    tuple[_Beta, _Beta],
    Field(
        description="AdamW (beta1, beta2), each in [0, 1). A DeepSpeed JSON's explicit `betas` "
        "wins over 'auto'."
    ),
]
AdamEps = Annotated[
    float, Field(gt=0.0, description="AdamW epsilon (DeepSpeed JSON: likewise `eps`).")
]
WeightDecay = Annotated[
    float,
    Field(
        ge=0.0,
        description="AdamW decoupled weight decay (DeepSpeed JSON: likewise `weight_decay`).",
    ),
]


def adamw_kwargs(policy: ReflectorConfig | GeneratorConfig) -> dict[str, Any]:
    """A policy section's AdamW keyword arguments (`torch.optim.AdamW(params, **...)`)."""
    return {
        "lr": policy.lr,
        "betas": tuple(policy.adam_betas),
        "eps": policy.adam_eps,
        "weight_decay": policy.weight_decay,
    }


def warn_low_precision_full_finetuning(cfg: Config, names: tuple[str, ...]) -> None:
    """Plain AdamW on bfloat16/float16 weights rounds away steps below their resolution (lr 1e-4
    moves ~9% of bf16 weights near 0.2); LoRA adapters are float32 and ZeRO keeps float32 master
    weights."""
    if cfg.distributed.deepspeed:
        return
    for name in names:
        section = getattr(cfg, name)
        if section.train and section.lora is None and section.dtype != "float32":
            log.warning(
                f"{name}: full fine-tuning in {section.dtype} without distributed.deepspeed "
                f"loses AdamW steps below the weights' resolution; use {name}.lora (float32 "
                f"adapters), {name}.dtype=float32 or DeepSpeed ZeRO (float32 master weights)"
            )


class LoRAConfig(_Section):
    """A LoRA adapter instead of full fine-tuning."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapter input, active in `r3rl sft` only: RL policies have "
        "every dropout zeroed at load (TRL's disable_dropout), so an on-policy ratio "
        "is exactly 1.",
    )
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt (null = the adapter's default)."
    )


class VLLMRolloutConfig(_Section):
    """The vLLM server that samples the reflector's rollouts when `reflector.rollout: vllm`
    (r3rl.models.vllm_rollout): one of `url` (a running server, `launch/vllm/serve.sh` with
    ROLLOUT=1), `launch` (r3rl starts and stops it) or `command` (with `url`: a shell command
    r3rl runs and stops)."""

    url: str | None = Field(
        None,
        description="OpenAI base URL of the rollout server, e.g. http://127.0.0.1:8000/v1 (null "
        "with launch=true: r3rl picks a free port on 127.0.0.1).",
    )
    launch: bool = Field(
        False,
        description="Start the server from the vLLM env (scripts/setup_vllm.sh) with the "
        "reflector's checkpoint at the start of training and stop it at the end.",
    )
    command: str | None = Field(
        None,
        description="A shell command that starts the server at `url` (e.g. launch/vllm/serve.sh "
        "with ROLLOUT=1); run at the start of training, its process group stopped at the end.",
    )
    model: str | None = Field(
        None, description="Served model name requests use (null = the server's only model)."
    )
    venv: str | None = Field(
        None, description="launch=true: the vLLM env (null = $R3RL_VLLM_VENV or .venv-vllm)."
    )
    threads: int | None = Field(
        None, gt=0, description="launch=true on CPU: OpenMP threads, not pinned (null = vLLM's)."
    )
    kv_cache_gib: int = Field(1, gt=0, description="launch=true on CPU: KV-cache size in GiB.")
    max_model_len: int = Field(
        2048, gt=0, description="launch=true: the server's maximum sequence length in tokens."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="launch=true: more vLLM server arguments."
    )
    startup_timeout_s: float = Field(
        300.0, gt=0.0, description="Seconds to wait for a launched server's /health."
    )
    timeout_s: float = Field(
        120.0,
        gt=0.0,
        description="Seconds any one request (a group's samples, a weight reload) may take before "
        "the run stops with a checkpoint.",
    )
    sync_dir: str | None = Field(
        None,
        description="Folder the trainer writes its weights to for the server to reload (it must "
        "see it: same node or shared FS; null = <output_dir>/vllm-sync).",
    )
    verify_tol: float = Field(
        1e-3,
        gt=0.0,
        description="After each sync the server's log-probs of a probe must equal the trainer's "
        "within this, or the run stops.",
    )
    is_cap: float = Field(
        3.0,
        ge=1.0,
        description="Truncated importance sampling (TRL's vllm_importance_sampling_correction, "
        "token_truncate): each token's policy loss is weighted by min(p_trainer / p_vllm, "
        "is_cap) (TRL 1.16's vllm_importance_sampling_clip_max is 3.0).",
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the server's bearer token (API_KEY)."
    )


class ReflectorConfig(_Section):
    """The vision-language model that critiques an image and writes the edit instruction."""

    model: str = Field("shapes:tiny", description="'shapes:tiny' or a local model directory.")
    train: bool = Field(True, description="Train the reflector with GRPO.")
    lr: float = Field(5e-6, gt=0.0, description="AdamW learning rate.")
    adam_betas: AdamBetas = (0.9, 0.95)
    adam_eps: AdamEps = 1e-8
    weight_decay: WeightDecay = 0.0
    lora: LoRAConfig | None = Field(None, description="LoRA settings (null = full fine-tuning).")
    temperature: float = Field(
        0.9, gt=0.0, description="Sampling temperature in training rollouts."
    )
    top_k: int = Field(50, ge=0, description="Top-k filter when sampling (0 = off).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus filter when sampling (1 = off).")
    max_new_tokens: int = Field(48, gt=0, description="Longest reflection in tokens.")
    epsilon_low: float = Field(0.2, ge=0.0, description="Lower PPO clip of the token ratio.")
    epsilon_high: float = Field(
        0.28, ge=0.0, description="Upper PPO clip of the token ratio (DAPO clip-higher)."
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo",
        description="Token-loss aggregation: per-sequence mean, constant normaliser, or batch "
        "token mean.",
    )
    beta: float = Field(
        0.001,
        ge=0.0,
        description="Weight of the k3 KL to the reference policy (0 = no reference model).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Trade compute for memory in the backward pass."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight dtype (bfloat16 on GPU for 7B models; CPU runs float32)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code shipped with the checkpoint to run."
    )
    offload: bool = Field(
        False,
        description="Keep the full-copy KL reference (full fine-tuning with beta > 0) in CPU "
        "memory, each layer copied to the GPU for its forward only.",
    )
    rollout: Literal["hf", "vllm"] = Field(
        "hf",
        description="Who samples the training rollouts' reflections: 'hf' (transformers' "
        "generate in the trainer) or 'vllm' (a vLLM server, `reflector.vllm`; weights synced "
        "and verified after every reflector step, truncated importance-sampling correction in "
        "the loss). Evaluation samples with 'hf' either way.",
    )
    vllm: VLLMRolloutConfig = Field(
        default_factory=VLLMRolloutConfig,
        description="The rollout server (reflector.rollout=vllm).",
    )


class GeneratorConfig(_Section):
    """The text-to-image diffusion model that draws the first image."""

    model: str = Field("shapes:tiny", description="'shapes:tiny' or a local diffusers directory.")
    family: Literal["auto", "flux", "sd3", "qwen_image", "qwen_image_edit"] = Field(
        "auto", description="Model family (auto = read from the checkpoint's transformer class)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Weight dtype of every component (bfloat16 on GPU; sampling math stays "
        "float32).",
    )
    train: bool = Field(False, description="Train the generator with FlowGRPO.")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate.")
    adam_betas: AdamBetas = (0.9, 0.95)
    adam_eps: AdamEps = 1e-8
    weight_decay: WeightDecay = 0.0
    lora: LoRAConfig | None = Field(
        None,
        description="LoRA on the transformer's attention projections (null = full fine-tuning); "
        "the KL reference is the adapter switched off.",
    )
    num_steps: int = Field(10, gt=0, description="Denoising steps in training rollouts.")
    guidance_scale: float = Field(
        1.0,
        ge=0.0,
        description="Distilled guidance embedding value (FLUX.1-dev style models only).",
    )
    cfg_scale: float = Field(
        1.0,
        ge=1.0,
        description="True classifier-free guidance against an empty prompt (1 = off); "
        "log-probs are those of the guided velocity.",
    )
    noise_level: float = Field(
        0.7, ge=0.0, description="SDE noise level a (eta) of the trained steps."
    )
    max_text_len: int | None = Field(
        None,
        gt=0,
        description="Tokens the text encoder reads (T5 / Qwen2.5-VL); null = the checkpoint's "
        "setting or the family's pipeline default (FLUX 512, SD3 256, Qwen-Image "
        "512).",
    )
    offload: bool = Field(
        False,
        description="Keep the frozen text encoders and VAE (and a full-copy KL reference) in CPU "
        "memory, each layer copied to the GPU for its forward only: less GPU memory, "
        "slower encoding.",
    )


class RegionConfig(_Section):
    """`refiner.mode: region` (RefineAnything): which box is refined and how it is pasted back."""

    box: list[float] | None = Field(
        None,
        min_length=4,
        max_length=4,
        description="Default region [x0, y0, x1, y1] in canvas fractions, used when neither the "
        "reflection (<box>x0 y0 x1 y1</box>) nor the prompt record ('region') names "
        "one (null = the whole image).",
    )
    margin: float = Field(
        0.25, ge=0.0, description="Crop margin around the box, as a fraction of its longer side."
    )
    dilate_px: int = Field(
        -1,
        ge=-8,
        le=8,
        description="Grow (> 0, RefineAnything's dilation) or shrink (< 0) the region mask "
        "before blurring; -1 with blur_sigma 0.5 keeps the feathered edge inside the region.",
    )
    blur_sigma: float = Field(
        0.5, ge=0.0, description="Gaussian blur of the paste mask, in pixels (cut at 2 sigma)."
    )

    @field_validator("box")
    @classmethod
    def _box(cls, box: list[float] | None) -> list[float] | None:
        if box is not None and not (
            0.0 <= box[0] < box[2] <= 1.0 and 0.0 <= box[1] < box[3] <= 1.0
        ):
            raise PydanticCustomError(
                "box", "expected [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1", {}
            )
        return box


class RegenerateConfig(_Section):
    """`refiner.mode: regenerate` (RvR): the semantic encoder and the shapes world's extra stage."""

    append_critique: bool = Field(
        False, description="Append the reflector's instruction to the target prompt."
    )
    semantic_encoder: str | None = Field(
        None,
        description="A transformers VLM folder whose image tokens condition the refiner "
        "(null = the refiner folder's own semantic_encoder/).",
    )
    pretrain_steps: int = Field(
        400, ge=0, description="Shapes world: flow-matching steps of the cached regenerate stage."
    )
    pretrain_pairs: int = Field(
        1500, gt=0, description="Shapes world: rendered pairs of the regenerate stage."
    )
    pretrain_lr: float = Field(
        5e-4, gt=0.0, description="Shapes world: learning rate of the regenerate stage."
    )


class SFTConfig(_Section):
    """`r3rl sft`: supervised flow matching of the refiner (in its mode) on JSONL pairs."""

    data: str | None = Field(
        None,
        description="JSONL of {instruction, target, input?, mask?, region?, prompt?}; images "
        "relative to it.",
    )
    steps: int = Field(500, gt=0, description="Optimiser steps.")
    batch_size: int = Field(16, gt=0, description="Pairs per step.")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate.")
    boundary_weight: float = Field(
        2.0,
        ge=0.0,
        description="Extra loss weight in the band around the mask edge (0 = plain flow matching).",
    )
    boundary_band_px: int = Field(
        2, ge=0, description="Half-width of the boundary band, in pixels."
    )
    cond_dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of pairs trained with an empty text (for CFG)."
    )

    _check_files = field_validator("data")(_existing_file)


class RefinerConfig(GeneratorConfig):
    """The image-editing diffusion model that turns an image and an instruction into a better
    image."""

    region: RegionConfig = Field(default_factory=RegionConfig, description="Region-mode settings.")
    regenerate: RegenerateConfig = Field(
        default_factory=RegenerateConfig, description="Regenerate-mode settings."
    )
    sft: SFTConfig = Field(default_factory=SFTConfig, description="`r3rl sft` settings.")

    train: bool = Field(True, description="Train the refiner with FlowGRPO.")
    noise_level: float = Field(
        1.0, ge=0.0, description="SDE noise level a (eta) of the trained steps."
    )
    mode: Literal["edit", "regenerate", "region"] = Field(
        "edit",
        description="edit the image (R3), regenerate from the target prompt (RvR), or refine a "
        "region (RefineAnything).",
    )


class FlowGRPOConfig(_Section):
    """FlowGRPO on denoising steps: clipping, KL and which timesteps are trained."""

    clip_range: float = Field(
        1e-4, gt=0.0, description="PPO clip of the per-step likelihood ratio."
    )
    adv_clip_max: float = Field(5.0, gt=0.0, description="Advantages are clipped to +-this.")
    beta: float = Field(
        0.04,
        ge=0.0,
        description="Weight of the KL to the reference on transition means, in flow_grpo's scale "
        "(||mu - mu_ref||^2 / (2 sigma_t^2)), so flow_grpo's train.beta copies across as it is.",
    )
    sde_type: Literal["sde", "cps"] = Field(
        "sde", description="Flow-SDE sampler or coefficients-preserving sampling."
    )
    logprob_reduction: Literal["mean", "sum"] = Field(
        "mean", description="Reduce a step's Gaussian log-density over C,H,W by mean or sum."
    )
    timesteps: Literal["all", "subset", "one", "window"] = Field(
        "one", description="Which SDE steps are trained (the rest are ODE)."
    )
    num_train_timesteps: int = Field(1, gt=0, description="How many steps 'subset' trains.")
    window_size: int = Field(2, gt=0, description="Length of the random SDE window of 'window'.")
    refine_max_index: int | None = Field(
        2,
        gt=0,
        description="Refiner steps are drawn from the first N (noisiest) only (null = all).",
    )


class RolloutConfig(_Section):
    """How episodes are sampled and how credit is assigned."""

    credit: Literal["r3", "tree", "text", "flow_grpo"] = Field(
        "r3",
        description="R3's alternating generate/refine steps, tree credit, plain GRPO on a "
        "text-only causal LM (`reflector.model`, no images), or plain FlowGRPO on "
        "the generator alone (no reflector or refiner is loaded; every step is a "
        "generate step, eval is round 0).",
    )
    group_size: int = Field(8, ge=2, description="Samples per group (GRPO needs at least 2).")
    prompts_per_step: int = Field(
        1, ge=1, description="credit=text: groups (prompts) per optimiser step."
    )
    max_rounds: int = Field(2, ge=1, description="Reflect-refine rounds per episode in training.")
    tree_k: int = Field(2, ge=1, description="Reflections sampled per tree node.")
    tree_m: int = Field(2, ge=1, description="Refinements sampled per reflection.")
    perfect_prob: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        description="Chance to draw a perfect-score image from the buffer for a refine step.",
    )
    buffer_size: int = Field(256, gt=0, description="Generated images kept for refine steps.")
    scale_rewards: Literal["none", "group", "batch"] = Field(
        "none",
        description="Divide the group-centred advantages by a std: 'group' (each group's; TRL's "
        "default), 'batch' (over every group of the optimiser step, on all ranks: TRL's 'batch', "
        "flow_grpo's global_std) or 'none' (R3). true/false mean group/none.",
    )
    format_weight: float = Field(1.0, ge=0.0, description="Weight of the reflection format reward.")
    perfect_stop_bonus: float = Field(
        1.0, description="Improvement credited for stopping on an already perfect image."
    )
    reason: bool = Field(
        False,
        description="R3's Reason stage: before generating, the reflector writes a plan per sample "
        "(a text-only turn, `<think>plan</think>`); the generator reads the prompt and the plan "
        "(`reason_template`) and GRPO trains the plan's tokens with the image's reward "
        "(r3rl/reason.py). Generate steps then run even with a frozen generator.",
    )
    reason_prompt: str | None = Field(
        None,
        description="The planning turn, with {prompt}; null = R3's planning prompt "
        "(GEN_THINK_SYSTEM_PROMPT), or the shapes world's own for its tiny reflector.",
    )
    reason_template: str = Field(
        "{prompt}. {plan}",
        description="The generator's text from the prompt and the plan (both placeholders).",
    )
    reason_max_new_tokens: int = Field(
        128,
        gt=0,
        description="Plan length cap in tokens; keep plan + prompt within what the generator's "
        "text encoders read (generator.max_text_len, CLIP's 77).",
    )

    @field_validator("reason_template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        for key in ("{prompt}", "{plan}"):
            if key not in value:
                raise ValueError(f"must contain {key}, e.g. '{{prompt}}. {{plan}}'")
        return value

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _scale_from_bool(cls, value: Any) -> Any:
        """Recipes written when this was a switch (true = the group's std) keep their meaning."""
        return (
            {True: "group", False: "none"}.get(value, value) if isinstance(value, bool) else value
        )


class EMAConfig(_Section):
    """An exponential moving average of each trained policy's trainable weights (flow_grpo's
    `train.ema`)."""

    decay: float = Field(
        0.9,
        gt=0.0,
        lt=1.0,
        description="Weight of the old average in a blend; the blend after the policy's "
        "optimiser step n uses min(decay, (1 + n) / (10 + n)), flow_grpo's warm-up.",
    )
    every: int = Field(
        8,
        ge=1,
        description="Blend the live weights in after every N-th optimiser step of the policy.",
    )


class TrainerConfig(_Section):
    """The training loop: length, checkpoints, loss weights and safety limits."""

    max_steps: int = Field(100, gt=0, description="Optimiser steps to train.")
    max_minutes: float | None = Field(
        None,
        gt=0.0,
        description="Also stop (evaluate, save) once training steps have taken this many minutes, "
        "evaluation excluded: compares methods at equal compute (null = max_steps only).",
    )
    eval_every: int = Field(20, ge=0, description="Evaluate every N steps (0 = only at step 0).")
    save_every: int = Field(50, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    grad_accum: int = Field(1, ge=1, description="Rollout batches accumulated per optimiser step.")
    image_loss_weight: float = Field(2.0, ge=0.0, description="Weight of the FlowGRPO loss.")
    text_loss_weight: float = Field(1.0, ge=0.0, description="Weight of the GRPO loss.")
    log_images_every: int = Field(
        10, ge=0, description="Log image grids every N steps (0 = never)."
    )
    max_nonfinite_steps: int = Field(
        3, ge=1, description="Stop after this many NaN/inf losses in a row."
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    ema: EMAConfig | None = Field(
        None,
        description="Keep an EMA of every trained policy's trainable weights (LoRA or all) and "
        "evaluate it in their place; checkpoints add it under ema/ (null = off: "
        "evaluate the live weights).",
    )


class EvalConfig(_Section):
    """Held-out evaluation: multi-round, early stop, deterministic sampling."""

    rounds: int = Field(3, ge=0, description="Refine rounds evaluated after round 0.")
    temperature: float = Field(0.3, ge=0.0, description="Reflector temperature (0 = greedy).")
    num_steps: int = Field(20, gt=0, description="Denoising steps (ODE).")
    batch_size: int = Field(16, gt=0, description="Prompts per evaluation batch.")
    samples_per_prompt: int = Field(
        1,
        gt=0,
        description="Images per held-out prompt (different seeds); more samples, less noisy means.",
    )
    gold: Literal["auto", "shapes", "none"] = Field(
        "auto",
        description="Eval-only gold scorer logged as eval/gold/* (never a training reward): "
        "'shapes' is the shapes world's stricter, independent judge; 'auto' uses it "
        "when the generator is shapes:tiny.",
    )


class JudgeConfig(_Section):
    """Limits on reward/judge failures."""

    max_failure_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Save and stop when a step's unscored fraction exceeds this.",
    )
    overlap: bool = Field(
        True,
        description="Score each training rollout in a background thread while the trainer makes "
        "the loss forwards that do not read the rewards (a slow judge off the critical path; "
        "the same numbers either way). false: score inline, for a reward that must not run "
        "beside the trainer's compute.",
    )


class DistributedConfig(_Section):
    """Multi-process training (torchrun / accelerate / deepspeed / srun set rank and world size)."""

    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Process-group backend ('auto' = nccl on CUDA, gloo on CPU)."
    )
    deepspeed: str | None = Field(
        None,
        description="DeepSpeed JSON config (e.g. launch/deepspeed/zero2.json) giving each "
        "trained policy its own ZeRO engine; 'auto' values are filled from the "
        "recipe (null = plain gradient all-reduce).",
    )
    timeout_s: int = Field(
        1800, gt=0, description="Seconds a collective may wait before the run fails."
    )

    _check_files = field_validator("deepspeed")(_existing_file)


class RewardSpec(_Section):
    """One reward of the weighted sum."""

    name: str = Field(
        description="Entry-point name (see `r3rl rewards list`) or path/to/file.py:function."
    )
    weight: float = Field(1.0, description="Weight in the sum.")
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the reward."
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        try:
            check_reward_name(name)
        except UserError as e:
            raise PydanticCustomError("unknown_reward", "{message}", {"message": str(e)}) from None
        return name


class Config(_Section):
    """A whole recipe."""

    output_dir: str = Field(
        description="Where config.yaml, metrics.jsonl, TensorBoard events and checkpoints go."
    )
    seed: int = Field(0, ge=0, description="Seed of every random number generator.")
    resume: str | None = Field(
        None,
        description="null, 'auto' (newest complete checkpoint in output_dir), or a checkpoint "
        "path.",
    )
    deterministic: bool = Field(
        True, description="Use deterministic kernels, so runs repeat exactly."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to run ('auto' = cuda if available)."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Prompt files.")
    world: WorldConfig = Field(
        default_factory=WorldConfig, description="The embedded shapes world."
    )
    reflector: ReflectorConfig = Field(
        default_factory=ReflectorConfig, description="The reflector (VLM)."
    )
    generator: GeneratorConfig = Field(
        default_factory=GeneratorConfig, description="The text-to-image generator."
    )
    refiner: RefinerConfig = Field(default_factory=RefinerConfig, description="The image refiner.")
    flow_grpo: FlowGRPOConfig = Field(
        default_factory=FlowGRPOConfig, description="FlowGRPO on denoising steps."
    )
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="Sampling and credit assignment."
    )
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="The training loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    judge: JudgeConfig = Field(
        default_factory=JudgeConfig, description="Reward/judge failure limits."
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Multi-process training."
    )
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec.model_construct(name="shapes_geneval")],
        min_length=1,
        description="Rewards whose weighted sum is the reward.",
    )

    @field_validator("resume")
    @classmethod
    def _resume_target(cls, value: str | None) -> str | None:
        return value if value == "auto" else _existing_file(value)

    def to_yaml(self) -> str:
        """The fully resolved recipe (defaults filled in); loading it gives the same Config."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The section model that a validation-error location points into (None if not a section)."""
    model: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(part, int):
            continue  # list index: the item type is already unwrapped
        if model is None or part not in model.model_fields:
            return None
        model = _section_type(model.model_fields[part].annotation)
    return model


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """Find the model inside `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _dotted(loc: Sequence[str | int]) -> str:
    """('rewards', 0, 'name') -> 'rewards[0].name'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _short(value: Any, limit: int = 60) -> str:
    """A repr that cannot break the one-line rule."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _explain(error: dict[str, Any]) -> str:
    """One pydantic error as a sentence naming the key, the bad value and what was expected."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    key = _dotted(loc)
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        fields = list(parent.model_fields) if parent else []
        prefix = _dotted(loc[:-1])
        suggestion = did_you_mean(str(loc[-1]), fields)
        if suggestion and prefix:
            suggestion = suggestion.replace(" '", f" '{prefix}.", 1)
        return f"unknown key '{key}'{suggestion}"
    if kind == "missing":
        return f"missing required key '{key}'"
    if kind in ("file_not_found", "unknown_reward"):
        return f"{key}: {error['msg']}"
    if kind == "model_type":
        return f"{key}={_short(value)} is not a mapping of keys"
    msg: str = error["msg"]
    if not msg.startswith("Input should be "):
        return f"{key}={_short(value)} is invalid: {msg[0].lower()}{msg[1:]}"
    expected = msg.removeprefix("Input should be ")
    if kind.endswith(("_parsing", "_type")):
        return f"{key}={_short(value)} is not {expected.split(', ')[0]}"
    return f"{key}={_short(value)} is invalid: expected {expected}"


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in the raw recipe; the value is YAML, so lists, dicts and null work."""
    dotted, sep, raw = override.partition("=")
    if not sep or not dotted:
        raise ConfigError(f"config error: override '{override}' is not of the form key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config error: override '{override}' is not valid YAML ({_yaml_problem(e)})"
        ) from None
    node: Any = data
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(part, node, here)]
        else:
            if node.get(part) is None:
                node[part] = [] if parts[i + 1].isdigit() else {}  # absent or null: start empty
            node = node[part]
        if parts[i + 1].isdigit() and not isinstance(node, list):
            raise ConfigError(f"config error: cannot set '{dotted}': '{here}' is not a list")
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"config error: cannot set '{dotted}': '{here}' is not a section")
    if isinstance(node, list):
        node[_list_index(parts[-1], node, dotted)] = value
    else:
        node[parts[-1]] = value


def _list_index(part: str, items: list[Any], where: str) -> int:
    """Override segments into a list are item numbers, e.g. `rewards.0.weight=2`."""
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"config error: '{where}' is not an item of the list (it has {len(items)} in this "
            "recipe)"
        )
    return int(part)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The position and problem of a YAML error, on one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def parse_config(data: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Validate a raw recipe mapping after applying dotted overrides; errors are `ConfigError`."""
    for override in overrides:
        _apply_override(data, override)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"config error: {_explain(errors[0])}{more}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML recipe, apply `key=value` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config error: {path} is not valid YAML ({_yaml_problem(e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config error: {path} must be a mapping of keys, not {type(data).__name__}"
        )
    return parse_config(data, overrides)
