"""Plain GRPO on a text-only causal LM (`rollout.credit: text`): the reflector's loss without
images.

Read top to bottom: `CausalLMPolicy` samples a group of completions per prompt with HF
`generate` and recomputes their log-probs; `grpo_step` is one rollout, one score, one
optimiser step; `train_text` is the recipe loop. A group's G completions share one prompt, so
its prompt runs once and its KV cache is repeated G times, in generate's prefill and in the
differentiable loss forward: identical samples, logits and gradients, (G-1)/G fewer prompt
FLOPs (bench/text_grpo_vs_trl.py measures it against TRL's GRPOTrainer).
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from r3rl.algos.advantages import divide_by_batch_std, group_advantages
from r3rl.algos.grpo import grpo_loss, token_logprobs
from r3rl.config import Config, adamw_kwargs, warn_low_precision_full_finetuning
from r3rl.errors import UserError
from r3rl.models.placement import execution_device, place_frozen, resolve_device
from r3rl.rewards import CombinedReward, chat_completions, chat_prompts


@dataclass(frozen=True)
class TextGRPOSettings:
    group: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 32
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    loss_type: str = "grpo"
    beta: float = 0.0
    scale_rewards: str = "group"  # "group", "batch" (all of the step's groups) or "none", as TRL
    max_grad_norm: float = 1.0
    shared_prefix: bool = True


@dataclass
class Completions:
    """One rollout: G rows per prompt (contiguous), left-padded prompts, right-padded
    completions."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor  # true up to and including EOS
    old_logps: torch.Tensor  # behaviour log-probs of the distribution sampled (0 where masked)
    texts: list[str]


class CausalLMPolicy:
    """A chat causal LM (any `AutoModelForCausalLM` with a chat template) as a GRPO policy."""

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        self.model, self.tok = model, tokenizer
        if tokenizer.pad_token_id is None:
            raise UserError(
                "the policy's tokenizer has no pad token; set one in its tokenizer_config.json"
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        trust_remote_code: bool = False,
        lora: dict | None = None,
        dtype: str | None = None,
    ) -> CausalLMPolicy:
        from r3rl.models.reflector import disable_dropout, lora_kwargs, with_lora

        kwargs = {"dtype": dtype} if dtype else {}
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, **kwargs
        )
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if lora is not None:
            model = with_lora(model, lora_kwargs(**lora))
        return cls(disable_dropout(model), tok)

    @property
    def device(self) -> torch.device:
        return execution_device(self.model)

    def prompt_inputs(self, prompts: list[str], group: int) -> dict[str, torch.Tensor]:
        enc = self.tok.apply_chat_template(
            [[{"role": "user", "content": p}] for p in prompts],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        return {
            k: v.repeat_interleave(group, 0).to(self.device)
            for k, v in enc.items()
            if k in ("input_ids", "attention_mask")
        }

    def _prefix_cache(self, ids: torch.Tensor, mask: torch.Tensor, group: int):
        """Run each group's prompt once (row 0 of the group) and repeat its KV cache G times."""
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model.get_decoder()(
            input_ids=ids[::group],
            attention_mask=mask[::group],
            position_ids=pos[::group],
            use_cache=True,
        )
        out.cache.batch_repeat_interleave(group)
        return out, pos

    @torch.no_grad()
    def sample(self, prompts: list[str], s: TextGRPOSettings) -> Completions:
        inputs = self.prompt_inputs(prompts, s.group)
        gen = GenerationConfig(
            do_sample=True,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            max_new_tokens=s.max_new_tokens,
            eos_token_id=self.tok.eos_token_id,
            pad_token_id=self.tok.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
            disable_compile=True,
        )
        extra = {}
        if s.shared_prefix:  # all but the last prompt token: generate prefills only that one
            extra["cache"] = self._prefix_cache(
                inputs["input_ids"][:, :-1], inputs["attention_mask"][:, :-1], s.group
            )[0].cache
        out = self.model.generate(**inputs, generation_config=gen, **extra)
        new = out.sequences[:, inputs["input_ids"].shape[1] :]
        # generate's scores are the processed logits (temperature, top-k, top-p): the sampled
        # distribution
        old = (
            torch.stack(out.scores, 1)
            .float()
            .log_softmax(-1)
            .gather(-1, new.unsqueeze(-1))
            .squeeze(-1)
        )
        is_eos = new == self.tok.eos_token_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), new.shape[1])
        mask = torch.arange(new.shape[1], device=new.device).unsqueeze(0) <= first.unsqueeze(1)
        ids = new.masked_fill(~mask, self.tok.pad_token_id)
        return Completions(
            inputs["input_ids"],
            inputs["attention_mask"],
            ids,
            mask,
            old.masked_fill(~mask, 0.0),
            self.tok.batch_decode(ids, skip_special_tokens=True),
        )

    def completion_logits(
        self, c: Completions, group: int, *, shared_prefix: bool = True
    ) -> torch.Tensor:
        """Logits (B, T, V) predicting each completion token, from one teacher-forced forward."""
        c_mask = c.completion_mask.long()
        if not shared_prefix:
            attn = torch.cat([c.prompt_mask, c_mask], 1)
            ids = torch.cat([c.prompt_ids, c.completion_ids], 1)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)  # the positions generate used for left padding
            t = c.completion_ids.shape[1]
            return self.model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=pos,
                use_cache=False,
                logits_to_keep=t + 1,
            ).logits[:, :-1]
        # prompt once per group; the repeated cache stays differentiable (prompt positions get
        # every completion's gradient)
        out, pos = self._prefix_cache(c.prompt_ids, c.prompt_mask, group)
        attn = torch.cat([c.prompt_mask, c_mask], 1)
        c_pos = pos[:, -1:] + c_mask.cumsum(-1)
        h = self.model.get_decoder()(
            input_ids=c.completion_ids[:, :-1],
            attention_mask=attn[:, :-1],
            position_ids=c_pos[:, :-1],
            cache=out.cache,
            use_cache=True,
        ).last_hidden_state
        last = out.last_hidden_state[:, -1:].repeat_interleave(group, 0)
        return self.model.get_output_embeddings()(torch.cat([last, h], 1))

    def logprobs(self, c: Completions, s: TextGRPOSettings, *, with_unfiltered: bool = False):
        """(logps, entropy) of the sampled distribution (temperature, top-k, top-p); with
        `with_unfiltered` also the unfiltered log-softmax (temperature only) of the same logits, the
        one the KL to the reference compares (TRL's)."""
        logits = self.completion_logits(c, s.group, shared_prefix=s.shared_prefix)
        out = token_logprobs(
            logits, c.completion_ids, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p
        )
        if not with_unfiltered:
            return out
        return (
            *out,
            token_logprobs(logits, c.completion_ids, temperature=s.temperature, top_k=0, top_p=1.0)[
                0
            ],
        )

    def reference_logprobs(
        self, c: Completions, s: TextGRPOSettings, ref: CausalLMPolicy | None
    ) -> torch.Tensor:
        """Unfiltered (top-k/top-p off) log-probs of the frozen reference: the LoRA-disabled base
        when the policy is a peft model, else `ref`."""
        unfiltered = TextGRPOSettings(**{**s.__dict__, "top_k": 0, "top_p": 1.0})
        with torch.no_grad():
            if ref is not None:
                return ref.logprobs(c, unfiltered)[0]
            with self.model.disable_adapter():
                return self.logprobs(c, unfiltered)[0]


def grpo_step(
    policy: CausalLMPolicy,
    opt: torch.optim.Optimizer,
    prompts: list[str],
    reward: CombinedReward,
    s: TextGRPOSettings,
    *,
    metadata: list[dict] | None = None,
    ref: CausalLMPolicy | None = None,
) -> dict[str, float]:
    """Sample a group per prompt, score, group advantages, one clipped GRPO update."""
    t0 = time.perf_counter()
    policy.model.eval()  # KV cache on, no dropout while sampling
    c = policy.sample(prompts, s)
    t1 = time.perf_counter()
    flat = [p for p in prompts for _ in range(s.group)]
    metas = [m for m in (metadata or [{"prompt": p} for p in prompts]) for _ in range(s.group)]
    # as TRL's GRPOTrainer calls rewards for a chat model: conversational prompts and completions,
    # the completion token ids up to and including EOS, the prompt records' other columns as kwargs
    ids = [row[m].tolist() for row, m in zip(c.completion_ids.cpu(), c.completion_mask.cpu())]
    res = reward.score_text(
        chat_prompts(flat), chat_completions(c.texts), metas, completion_ids=ids
    )
    rewards = torch.tensor([math.nan if r is None else float(r) for r in res.total])
    adv, valid, zero, groups = group_advantages(
        rewards,
        torch.arange(len(prompts)).repeat_interleave(s.group),
        scale_std=s.scale_rewards == "group",
    )
    if s.scale_rewards == "batch":
        (adv,) = divide_by_batch_std([adv], [rewards])
    t2 = time.perf_counter()
    policy.model.train()  # gradient checkpointing; dropout was zeroed at load (disable_dropout)
    logps, entropy, kl_logps = policy.logprobs(c, s, with_unfiltered=True)
    ref_logps = policy.reference_logprobs(c, s, ref) if s.beta > 0 else None
    mask = c.completion_mask & valid[:, None].to(logps.device)  # rewards live on the CPU
    loss, m = grpo_loss(
        logps,
        c.old_logps,
        adv.to(logps.device),
        mask,
        kl_logps=kl_logps,
        ref_logps=ref_logps,
        epsilon_low=s.epsilon_low,
        epsilon_high=s.epsilon_high,
        beta=s.beta,
        loss_type=s.loss_type,
        max_completion_length=s.max_new_tokens,
    )
    loss.backward()
    params = [p for p in policy.model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    scored = rewards[~torch.isnan(rewards)]
    out = {
        "stage": "text",
        "reward/mean": float(scored.mean()) if scored.numel() else math.nan,
        "reward/std": float(scored.std()) if scored.numel() > 1 else 0.0,
        "judge/failures": int(torch.isnan(rewards).sum()),
        "loss/grpo": loss.item(),
        "clip_ratio": m["clip_ratio/region_mean"],
        "grad_norm": grad_norm,
        "entropy": float(entropy.detach()[mask].mean()) if mask.any() else math.nan,
        "completion_length": float(c.completion_mask.sum(1).float().mean()),
        "frac_reward_zero_std": zero / max(1, groups),
        "time/rollout_s": t1 - t0,
        "time/reward_s": t2 - t1,
        "time/train_s": t3 - t2,
        "time/step_s": t3 - t0,
    }
    if "kl" in m:
        out["kl/text"] = m["kl"]
    for name, vals in res.components.items():
        ok = [v for v in vals if v is not None]
        out[f"reward/{name}"] = sum(ok) / len(ok) if ok else math.nan
    return out


def _save(policy: CausalLMPolicy, out: Path, step: int, keep_last: int) -> Path:
    """Weights (or the LoRA adapter) + tokenizer, published atomically like every r3rl
    checkpoint."""
    from r3rl.checkpoint import publish

    final, tmp = out / "checkpoints" / f"step-{step}", out / "checkpoints" / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.model.save_pretrained(tmp)
    policy.tok.save_pretrained(tmp)
    publish(tmp, final, keep_last=keep_last)
    return final


def train_text(cfg: Config) -> None:
    """`r3rl train` with `rollout.credit: text`: GRPO on `reflector.model` as a text-only causal
    LM."""
    from r3rl.data import load_prompts
    from r3rl.distributed import topology_from_env
    from r3rl.logger import RunLogger, quiet_libraries

    quiet_libraries()
    if cfg.reflector.rollout == "vllm":
        raise UserError(
            "reflector.rollout=vllm is not supported with rollout.credit=text yet; use "
            "reflector.rollout=hf"
        )
    if topology_from_env().distributed:  # each rank would train its own copy into one output_dir
        raise UserError("rollout.credit=text runs in one process only; start it without a launcher")
    warn_low_precision_full_finetuning(cfg, ("reflector",))
    if cfg.resume is not None:
        raise UserError(
            "resume is not supported with rollout.credit=text yet; start a new run (resume=null)"
        )
    if cfg.trainer.ema is not None:
        raise UserError(
            "trainer.ema is not supported with rollout.credit=text (it has no evaluation to use "
            "the average); set trainer.ema=null"
        )
    if cfg.data.train_prompts is None:
        raise UserError(
            "rollout.credit=text needs data.train_prompts (a JSONL file with a 'prompt' per line)"
        )
    torch.manual_seed(cfg.seed)
    rc = cfg.reflector
    path = Path(rc.model)
    if not path.is_dir():
        raise UserError(
            "reflector.model must be a local causal-LM directory with rollout.credit=text; got "
            f"{rc.model!r}"
        )
    device = resolve_device(cfg.device)
    policy = CausalLMPolicy.from_pretrained(
        path,
        trust_remote_code=rc.trust_remote_code,
        lora=rc.lora.model_dump() if rc.lora else None,
        dtype=rc.dtype,
    )
    policy.model.to(device)
    ref = None
    if rc.beta > 0 and rc.lora is None:
        ref_model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=rc.trust_remote_code, dtype=rc.dtype
        )
        ref = CausalLMPolicy(ref_model.eval().requires_grad_(False), policy.tok)
        place_frozen(ref.model, device, offload_it=rc.offload)
    s = TextGRPOSettings(
        group=cfg.rollout.group_size,
        temperature=rc.temperature,
        top_k=rc.top_k,
        top_p=rc.top_p,
        max_new_tokens=rc.max_new_tokens,
        epsilon_low=rc.epsilon_low,
        epsilon_high=rc.epsilon_high,
        loss_type=rc.loss_type,
        beta=rc.beta,
        scale_rewards=cfg.rollout.scale_rewards,
        max_grad_norm=cfg.trainer.max_grad_norm,
    )
    opt = torch.optim.AdamW(
        [p for p in policy.model.parameters() if p.requires_grad], **adamw_kwargs(rc)
    )
    records = load_prompts(cfg.data.train_prompts)
    reward = CombinedReward(cfg.rewards)
    if reward.has_image or not reward.has_text:
        names = [k for k, f in zip(reward.keys, reward.fns) if not f.is_text]
        names = ", ".join(names) or "(no text reward given)"
        raise UserError(
            "rollout.credit=text scores completions only, with text rewards (they take "
            f"'completions' or 'completion_ids'); these score images: {names}"
        )
    rng = random.Random(cfg.seed)
    out, tc = Path(cfg.output_dir), cfg.trainer
    with RunLogger(out, total_steps=tc.max_steps, start_step=1) as logger:
        logger.save_config(cfg)
        for step in range(1, tc.max_steps + 1):
            batch = [rng.choice(records) for _ in range(cfg.rollout.prompts_per_step)]
            row = grpo_step(
                policy, opt, [r["prompt"] for r in batch], reward, s, metadata=batch, ref=ref
            )
            logger.log(step, row)
            if (tc.save_every and step % tc.save_every == 0) or step == tc.max_steps:
                logger.info(f"saved {_save(policy, out, step, tc.keep_last)}")
