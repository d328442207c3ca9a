"""FlowGRPO math: a rectified-flow sampler step that also returns its log-probability, and the loss.

Conventions (design.md §4): σ runs from 1 (noise) to 0 (data), `dt = σ_next − σ < 0`, and the
model predicts the velocity `v` with `x_next ≈ x + v·dt`. Everything is computed in float32 so
that bf16 models don't overflow the mean or turn log-prob ratios into noise.

Log-probs are exact Gaussian log-densities, constants included, reduced over all non-batch
dims by `mean` (FlowGRPO and R3) or `sum`. The reduction sets the scale of `logp − logp_old`,
hence the effective PPO clip range: with `mean` a clip of 1e-4 is usual, with `sum` it must be
scaled by the number of latent elements.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

Generator = torch.Generator | Sequence[torch.Generator] | None
Sigma = float | torch.Tensor

SDE_TYPES = ("sde", "cps")
REDUCTIONS = ("mean", "sum")
STRATEGIES = ("all", "subset", "one", "window")
KL_FORMS = ("flow_grpo", "r3", "exact")


def sigma_schedule(
    num_steps: int, shift: float = 1.0, terminal: float | None = None
) -> torch.Tensor:
    """σ from 1 to 0 in `num_steps` steps, shape (num_steps + 1,), with the SD3/FLUX time shift.

    `shift > 1` spends more steps at high noise, where large images need them. `terminal`
    (a scheduler's `shift_terminal`, Qwen-Image: 0.02) stretches the shifted σ so the last one
    before 0 equals it, as FlowMatchEulerDiscreteScheduler does: the final step then covers
    only the little noise left instead of a large jump.
    """
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    s = shift * s / (1.0 + (shift - 1.0) * s)
    if terminal is not None:
        s[:-1] = 1.0 - (1.0 - s[:-1]) * (1.0 - terminal) / (1.0 - s[-2])
    return s.float()


def _per_sample(value: Sigma, like: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor as float32 of shape (B, 1, ..., 1), broadcastable against `like`."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device).reshape(-1)
    t = t.expand(like.shape[0]) if t.numel() == 1 else t
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """Mean or sum over every non-batch dim; the choice is the log-prob convention."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    dims = tuple(range(1, x.ndim))
    return x.mean(dim=dims) if reduction == "mean" else x.sum(dim=dims)


def _randn(shape: torch.Size, generator: Generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise; a list of generators gives one per sample so a sample's noise does not
    depend on which batch it lands in. Drawn on each generator's own device (a CPU generator cannot
    fill a CUDA tensor), then moved: the same seed gives the same noise anywhere."""

    def draw(size, g: torch.Generator | None) -> torch.Tensor:
        on = device if g is None else g.device
        return torch.randn(size, generator=g, dtype=torch.float32, device=on).to(device)

    if generator is None or isinstance(generator, torch.Generator):
        return draw(shape, generator)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([draw(shape[1:], g) for g in generator])


def sde_noise_level(
    sigma: torch.Tensor,
    noise_level: float,
    sigma_cap: float | None = None,
    sigma_next: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlowGRPO's diffusion coefficient `σ_t = a·sqrt(σ / (1 − σ'))` (flow_grpo's `std_dev_t`).

    `σ' = σ` below 1. At σ = 1 the formula is infinite; flow_grpo (`sd3_sde_with_logprob`) then
    takes the scheduler's `sigmas[1]`, the σ after the first step, which is this step's `sigma_next`
    (the default, `sigma_cap=None`; σ = 1 without `sigma_next` is an error). `sigma_cap` instead
    caps σ' at that value on every step, R3's `eta_mode='monotonic'` (`sqrt(t / (1 − min(t,
    0.95)))`): it also lowers the noise of every step with 1 > σ > cap.
    """
    if sigma_cap is not None:
        return noise_level * torch.sqrt(sigma / (1.0 - sigma.clamp(max=sigma_cap)))
    at_one = sigma >= 1.0
    if sigma_next is None:
        if bool(at_one.any()):
            raise ValueError(
                "the noise level at sigma = 1 needs sigma_next (flow_grpo's sigmas[1]) or a "
                "sigma_cap"
            )
        return noise_level * torch.sqrt(sigma / (1.0 - sigma))
    sigma_next = torch.as_tensor(sigma_next, dtype=sigma.dtype, device=sigma.device)
    return noise_level * torch.sqrt(sigma / (1.0 - torch.where(at_one, sigma_next, sigma)))


def sde_noise_std(
    sigma: Sigma,
    sigma_next: Sigma,
    noise_level: float = 0.7,
    sde_type: str = "sde",
    sigma_cap: float | None = None,
) -> torch.Tensor:
    """Standard deviation of one transition x → x_next, in the broadcast shape of the sigmas.

    sde: `σ_t·sqrt(−dt)`; cps: `σ_next·sin(a·π/2)`.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sigma.device)
    if sde_type == "sde":
        return sde_noise_level(sigma, noise_level, sigma_cap, sigma_next) * torch.sqrt(
            sigma - sigma_next
        )
    if sde_type == "cps":
        return sigma_next * math.sin(noise_level * math.pi / 2)
    raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")


def _transition_mean(
    v: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    std: torch.Tensor,
    noise_level: float,
    sde_type: str,
    sigma_cap: float | None,
) -> torch.Tensor:
    """Mean of x_next given x and v (float32; sigmas and std broadcast per sample)."""
    if sde_type == "sde":
        dt = sigma_next - sigma
        sigma_t_sq = sde_noise_level(sigma, noise_level, sigma_cap, sigma_next) ** 2
        return (
            x * (1 + sigma_t_sq / (2 * sigma) * dt)
            + v * (1 + sigma_t_sq * (1 - sigma) / (2 * sigma)) * dt
        )
    # cps: re-noise the predicted x0 to σ_next, splitting σ_next² between the predicted noise
    # (deterministic part) and fresh noise (std²), so the marginal noise level is preserved.
    x0 = x - sigma * v
    x1 = x + (1 - sigma) * v
    return x0 * (1 - sigma_next) + x1 * torch.sqrt((sigma_next**2 - std**2).clamp(min=0.0))


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: Generator = None,
    sde_type: str = "sde",
    logprob_reduction: str = "mean",
    sigma_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stochastic denoising step and the log-probability of its result.

    Args:
        velocity: the (guided) velocity actually used for sampling, (B, ...).
        sample: x at σ, same shape.
        sigma, sigma_next: floats or per-sample (B,) tensors, σ > σ_next ≥ 0.
        noise_level: `a` (≈0.7 SD3, 0.9 FLUX; R3: 0.7 generate, 1.0 edit).
        prev_sample: when given (training), the log-prob of this x_next is returned instead of
            sampling one; pass the float32 tensor this function returned during the rollout.
        generator: a torch.Generator, or one per sample.
        sde_type: "sde" (FlowGRPO) or "cps" (coefficients-preserving sampling). For cps the
            log-prob is the full Gaussian log-density like sde, whereas FlowGRPO's cps drops the
            constants and the 1/(2·std²) factor; std does not depend on the model, so ratios are
            ours raised to the power 2·std² (clip ranges tuned for FlowGRPO's cps don't transfer).
            cps has std = 0 at σ_next = 0, so its last step is deterministic and must not be
            trained.
        logprob_reduction: "mean" or "sum" over the non-batch dims.
        sigma_cap: None (flow_grpo): σ as it is in the noise level, and at σ = 1 the next σ on the
            grid (flow_grpo's `scheduler.sigmas[1]`); a float caps σ at it on every step (R3: 0.95).

    Returns:
        prev_sample (float32), log_prob (B,), prev_mean (float32, shape of sample), std (B,):
        the transition's standard deviation, the one `log_prob` uses.
    """
    v, x = velocity.float(), sample.float()
    sig, sig_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std = sde_noise_std(sig, sig_next, noise_level, sde_type, sigma_cap)
    mean = _transition_mean(v, x, sig, sig_next, std, noise_level, sde_type, sigma_cap)
    if prev_sample is None:
        prev_sample = mean + std * _randn(x.shape, generator, x.device)
    prev_sample = prev_sample.detach().float()
    log_density = (
        -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    )
    return prev_sample, _reduce(log_density, logprob_reduction), mean, std.reshape(-1)


def ode_step(
    velocity: torch.Tensor, sample: torch.Tensor, sigma: Sigma, sigma_next: Sigma
) -> torch.Tensor:
    """Plain Euler step `x + v·dt` in float32: the deterministic steps outside the trained ones."""
    x = sample.float()
    return x + velocity.float() * (_per_sample(sigma_next, x) - _per_sample(sigma, x))


def kl_std(std: Sigma, sigma: Sigma, sigma_next: Sigma, sde_type: str = "sde") -> torch.Tensor:
    """flow_grpo's `std_dev_t`, the scale its KL divides by, from a transition's std (B,):
    the noise level σ_t = std / sqrt(σ − σ_next) for sde, the transition std itself for cps."""
    std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if sde_type == "cps":
        return std
    if sde_type != "sde":
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    dt = torch.as_tensor(sigma, dtype=torch.float32, device=std.device) - torch.as_tensor(
        sigma_next, dtype=torch.float32, device=std.device
    )
    return std / torch.sqrt(dt.reshape(-1))


def image_kl(
    prev_mean: torch.Tensor,
    ref_prev_mean: torch.Tensor,
    std: Sigma,
    *,
    sigma: Sigma | None = None,
    sigma_next: Sigma | None = None,
    sde_type: str = "sde",
    kl_form: str = "flow_grpo",
    reduction: str = "mean",
) -> torch.Tensor:
    """The KL term β multiplies, per sample (B,), in the scale of the reference `kl_form` names,
    so a β copied from it means the same here:

    - "flow_grpo" (`train_sd3.py`): `reduce(‖μ − μ_ref‖²) / (2·std_dev_t²)`, std_dev_t = σ_t for sde
      (not the transition std σ_t·sqrt(−dt): the exact Gaussian KL times −dt), the std for cps;
      needs `sigma` and `sigma_next` for sde.
    - "r3" (R3's `GaussianDistribution.kl_divergence`): `reduce(‖μ − μ_ref‖² / std²)`, the
    transition std and no 1/2 (twice the exact KL).
    - "exact": the exact KL between the two transition Gaussians, `reduce(‖μ − μ_ref‖²) / (2·std²)`.

    `reduction` ("mean", as both references, or "sum") runs over the non-batch dims.
    """
    sq = (prev_mean.float() - ref_prev_mean.float().detach()) ** 2
    if kl_form == "flow_grpo" and sde_type == "sde":
        if sigma is None or sigma_next is None:
            raise ValueError(
                "flow_grpo's KL on sde steps needs sigma and sigma_next (it divides by sigma_t^2)"
            )
        scale = kl_std(std, sigma, sigma_next, sde_type)
        return _reduce(sq, reduction) / (2 * scale.to(sq.device) ** 2)
    var = _per_sample(std, sq) ** 2
    if kl_form in ("flow_grpo", "exact"):  # cps: flow_grpo's std_dev_t is the transition std
        return _reduce(sq / (2 * var), reduction)
    if kl_form == "r3":
        return _reduce(sq / var, reduction)
    raise ValueError(f"kl_form must be one of {KL_FORMS}, got {kl_form!r}")


def flow_grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    prev_mean: torch.Tensor | None = None,
    ref_prev_mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    beta: float = 0.0,
    reduction: str = "mean",
    sigma: Sigma | None = None,
    sigma_next: Sigma | None = None,
    sde_type: str = "sde",
    kl_form: str = "flow_grpo",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped policy loss of one trained denoising step, plus β·KL to the reference policy.

    All tensors have batch size B; log-probs and advantages are (B,). `std` is the transition std
    `sde_step_with_logprob` returns, `sigma`/`sigma_next` the step's (B,) or float sigmas. The KL is
    `image_kl` in the scale of `kl_form`, so β means what it means there: flow_grpo's β 0.04 is
    β 0.04 with "flow_grpo" (the default), R3's kl_weight_image 0.001 is β 0.001 with "r3".
    Without `sigma`/`sigma_next` (callers from before they were passed) the sde KL falls back to
    "exact", which is flow_grpo's times 1/(−dt), with a warning.

    Metrics: clip_ratio (fraction with |ratio − 1| > clip_range), approx_kl
    (0.5·mean((logp − logp_old)²)), ratio_mean, and kl (mean of the KL term) when means are given.
    """
    log_prob, old_log_prob = log_prob.float(), old_log_prob.float().detach()
    adv = advantages.float().detach().clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(-adv * ratio, -adv * clipped).mean()
    with torch.no_grad():
        metrics = {
            "clip_ratio": ((ratio - 1.0).abs() > clip_range).float().mean().item(),
            "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).mean().item(),
            "ratio_mean": ratio.mean().item(),
        }
    if prev_mean is not None and ref_prev_mean is not None and std is not None:
        form = kl_form
        if form == "flow_grpo" and sde_type == "sde" and (sigma is None or sigma_next is None):
            warnings.warn(
                "flow_grpo_loss without sigma/sigma_next: the image KL is the exact transition KL, "
                "not flow_grpo's (pass the step's sigmas)",
                stacklevel=2,
            )
            form = "exact"
        kl = image_kl(
            prev_mean,
            ref_prev_mean,
            std,
            sigma=sigma,
            sigma_next=sigma_next,
            sde_type=sde_type,
            kl_form=form,
            reduction=reduction,
        ).mean()
        loss = loss + beta * kl
        metrics["kl"] = kl.item()
    elif beta != 0.0:
        raise ValueError("beta != 0 needs prev_mean, ref_prev_mean and std")
    return loss, metrics


def select_train_timesteps(
    num_steps: int,
    batch_size: int,
    strategy: str,
    *,
    k: int | None = None,
    window: int = 2,
    max_index: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Which denoising steps of each sample run the SDE and are trained: bool (B, num_steps).

    Strategies: "all"; "subset" (k random steps); "one" (one random step, R3); "window" (a
    contiguous run of `window` steps, MixGRPO / FlowGRPO-Fast, ODE elsewhere). Choices are drawn
    independently per sample so every step gets trained across a batch. `max_index` restricts
    them to the first (noisiest) `max_index` steps (R3 edits: 2).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    limit = num_steps if max_index is None else min(max_index, num_steps)
    mask = torch.zeros(batch_size, num_steps, dtype=torch.bool)
    if strategy == "all":
        mask[:, :limit] = True
        return mask
    if strategy == "window":
        if not 1 <= window <= limit:
            raise ValueError(f"window must be in [1, {limit}], got {window}")
        start = torch.randint(0, limit - window + 1, (batch_size, 1), generator=generator)
        steps = torch.arange(num_steps).unsqueeze(0)
        return (steps >= start) & (steps < start + window)
    k = 1 if strategy == "one" else k
    if k is None or not 1 <= k <= limit:
        raise ValueError(f"subset needs k in [1, {limit}], got {k}")
    picks = torch.rand(batch_size, limit, generator=generator).argsort(dim=1)[:, :k]
    return mask.scatter(1, picks, True)
