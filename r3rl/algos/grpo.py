"""GRPO math on text tokens: log-probs of the sampling distribution and the clipped loss (TRL
semantics)."""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def sampling_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Float32 logits of the distribution `generate()` samples from: /temperature, then top-k,
    then top-p, as HF's warpers do (filtered tokens get -inf, at least one token survives)."""
    scores = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1.0 - top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def token_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (B, T) of `token_ids` and per-token entropy (B, T) of the sampling distribution.

    Behaviour and current log-probs must both come from the distribution actually sampled
    (R3 took them at temperature 1 without the filter, so its ratios were biased). A token
    outside the current top-k/top-p set gets -inf: its ratio is 0, and a k3 KL against such a
    log-prob is infinite, so take reference/KL log-probs without the filter if that can happen.
    `logits` (B, T, V) must be aligned with `token_ids` (logits at position t predict token t).
    """
    logp_all = torch.log_softmax(
        sampling_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p), dim=-1
    )
    logps = logp_all.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    p_logp = torch.where(
        torch.isfinite(logp_all), logp_all.exp() * logp_all, torch.zeros_like(logp_all)
    )
    return logps, -p_logp.sum(dim=-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π‖π_ref) on tokens sampled from π: exp(d) − d − 1, d = ref −
    logp. Unbiased and always ≥ 0."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return (torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)).item()


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    kl_logps: torch.Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    beta: float = 0.0,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level clipped policy loss (+ β·k3 KL) over completions, aggregated like TRL.

    Args:
        logps, old_logps, ref_logps: (B, T) log-probs of the completion tokens.
        kl_logps: (B, T) the policy's log-probs the KL reads, when they differ from `logps`: the
            ratio must use the distribution sampled (top-k/top-p filtered), the KL the unfiltered
            log-softmax of the same logits against the unfiltered reference, as TRL does (a
            filtered policy against an unfiltered reference has KL > 0 at equal weights).
        advantages: (B,) per sequence, or (B, T) per token.
        mask: (B, T), true on completion tokens; values elsewhere are ignored (may be inf/NaN).
        loss_type: "grpo" (mean over each sequence's tokens, then over sequences), "dr_grpo"
            (sum / (B · max_completion_length), default T), "dapo" (sum / tokens in the batch).
        is_weights: (B, T) per-token weights of the clipped policy term (not of the KL), TRL's
            vllm_importance_sampling_correction: `min(p_trainer / p_sampler, cap)` when another
            engine (vLLM) sampled the tokens (`r3rl.models.vllm_rollout`).

    Metrics: clip_ratio/low_mean, /high_mean, /region_mean (TRL: tokens whose ratio left the
    range on the side where clipping removes the gradient), ratio_mean, and kl when ref given.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logps.device)
    # Sanitise masked positions first so padding can't push inf/NaN into values or gradients.
    lp = torch.where(mask, logps.float(), zero)
    old = torch.where(mask, old_logps.float().detach(), zero)
    adv = advantages.float().detach()
    adv = adv.unsqueeze(1) if adv.ndim == 1 else adv
    ratio = torch.exp(lp - old)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if is_weights is not None:  # before the KL is added, as TRL does
        per_token = per_token * torch.where(mask, is_weights.float().detach(), zero)
    kl = None
    if ref_logps is not None:
        kl_lp = lp if kl_logps is None else torch.where(mask, kl_logps.float(), zero)
        kl = k3_kl(kl_lp, torch.where(mask, ref_logps.float().detach(), zero))
        per_token = per_token + beta * kl
    elif beta != 0.0:
        raise ValueError("beta != 0 needs ref_logps")
    per_token = torch.where(mask, per_token, zero)
    n_tokens = mask.sum(dim=-1).clamp(min=1)
    if loss_type == "grpo":
        loss = (per_token.sum(dim=-1) / n_tokens).mean()
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (
            per_token.shape[0] * (max_completion_length or per_token.shape[1])
        )
    else:
        loss = per_token.sum() / mask.sum().clamp(min=1)
    with torch.no_grad():
        low = (ratio < 1.0 - epsilon_low) & (adv < 0)
        high = (ratio > 1.0 + epsilon_high) & (adv > 0)
        metrics = {
            "clip_ratio/low_mean": _masked_mean(low.float(), mask),
            "clip_ratio/high_mean": _masked_mean(high.float(), mask),
            "clip_ratio/region_mean": _masked_mean((low | high).float(), mask),
            "ratio_mean": _masked_mean(ratio, mask),
        }
        if kl is not None:
            metrics["kl"] = _masked_mean(kl, mask)
    return loss, metrics
