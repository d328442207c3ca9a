"""The denoising loop: SDE (with log-probs) on the trained steps, ODE everywhere else.

FlowGRPO needs, for each trained step, the state before it, the state after it and the
behaviour log-prob; everything else is plain Euler so rollouts stay cheap and sharp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r3rl.algos.flow_grpo import ode_step, sde_step_with_logprob
from r3rl.models.base import FlowModel, TextCond


@dataclass
class Trajectory:
    """Final latents plus the K trained transitions of every sample."""

    latents: torch.Tensor  # (B, N, C) x0
    states: torch.Tensor  # (B, K, N, C) x before each trained step
    next_states: torch.Tensor  # (B, K, N, C) x after it (the sampled action)
    sigmas: torch.Tensor  # (B, K)
    sigmas_next: torch.Tensor  # (B, K)
    logps: torch.Tensor  # (B, K) behaviour log-probs

    def index(self, idx: torch.Tensor | slice) -> Trajectory:
        return Trajectory(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    @staticmethod
    def cat(trajs: list[Trajectory]) -> Trajectory:
        return Trajectory(
            *(torch.cat([getattr(t, f) for t in trajs]) for f in Trajectory.__dataclass_fields__)
        )


@dataclass(frozen=True)
class SDEConfig:
    """How the trained steps are sampled and scored (design.md §4)."""

    noise_level: float = 0.7
    sde_type: str = "sde"
    logprob_reduction: str = "mean"


@torch.no_grad()
def sample(
    model: FlowModel,
    cond: TextCond,
    ref: torch.Tensor | None,
    sigmas: torch.Tensor,
    sde_mask: torch.Tensor,
    sde: SDEConfig,
    generator: torch.Generator | None = None,
    x: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> Trajectory:
    """Run `len(sigmas) - 1` steps from noise; rows of `sde_mask` (B, steps) pick the SDE steps.

    Every row must select the same number K of steps (all strategies in
    `select_train_timesteps` do), so transitions stack into (B, K, ...).

    `keep` (indices into a batch of `len(sde_mask)`) simulates only those rows of a larger
    batch: the mask, the initial noise and every step's noise are drawn for the whole batch and
    sliced, so a sample's trajectory does not depend on how a group is split across ranks.
    `cond` and `ref` then hold the kept rows only.
    """
    full = sde_mask.shape[0]
    keep = torch.arange(full) if keep is None else keep
    sde_mask_full, sde_mask = sde_mask, sde_mask[keep]
    b = cond.embeds.shape[0]
    x = model.noise(full, generator)[keep] if x is None else x
    if tuple(sde_mask.shape) != (b, len(sigmas) - 1):
        raise ValueError(
            f"sde_mask must be (batch, steps) = {(b, len(sigmas) - 1)}, got {tuple(sde_mask.shape)}"
        )
    k = int(sde_mask_full[0].sum())
    if not bool((sde_mask.sum(1) == k).all()):
        raise ValueError("every sample must train the same number of steps")
    if sde.sde_type == "cps" and bool((sde_mask & (sigmas[1:] <= 0).to(sde_mask.device)).any()):
        # cps has std = sigma_next·sin(...) = 0 there: a deterministic step with log-prob NaN
        raise ValueError(
            "cps cannot train a step that ends at sigma = 0 (std 0); exclude the last step"
        )
    states, nexts, s_now, s_next, logps = [], [], [], [], []
    for i in range(len(sigmas) - 1):
        sig, sig_next = float(sigmas[i]), float(sigmas[i + 1])
        v = model.velocity(x, torch.full((b,), sig, device=x.device), cond, ref)
        rows = sde_mask[:, i].to(x.device)
        x_ode = ode_step(v, x, sig, sig_next)
        if sde_mask_full[:, i].any():  # some row of the whole batch draws noise here
            noise = torch.randn((full, *x.shape[1:]), generator=generator, dtype=torch.float32)[
                keep
            ].to(x.device)
            _, _, mean, std = sde_step_with_logprob(
                v,
                x,
                sig,
                sig_next,
                noise_level=sde.noise_level,
                prev_sample=x,
                sde_type=sde.sde_type,
                logprob_reduction=sde.logprob_reduction,
            )
            x_sde, logp, _, _ = sde_step_with_logprob(
                v,
                x,
                sig,
                sig_next,
                noise_level=sde.noise_level,
                prev_sample=mean + std.view(-1, *[1] * (x.ndim - 1)) * noise,
                sde_type=sde.sde_type,
                logprob_reduction=sde.logprob_reduction,
            )
            x_new = torch.where(rows[:, None, None], x_sde.to(x.dtype), x_ode)
            states.append(x), nexts.append(x_new), logps.append(logp)
            s_now.append(torch.full((b,), sig)), s_next.append(torch.full((b,), sig_next))
            x = x_new
        else:
            x = x_ode
    if k == 0:
        empty = x.new_zeros((b, 0) + tuple(x.shape[1:]))
        z = torch.zeros(b, 0)
        return Trajectory(x, empty, empty, z, z, z)
    # keep, per sample, only the steps its mask selected (other rows were ODE at that step)
    mask = sde_mask[:, [i for i in range(sde_mask.shape[1]) if sde_mask_full[:, i].any()]]
    pick = lambda seq: torch.stack(seq, 1)[mask].view(b, k, *seq[0].shape[1:])
    return Trajectory(x, pick(states), pick(nexts), pick(s_now), pick(s_next), pick(logps))


def transition_logprob(
    model: FlowModel,
    traj: Trajectory,
    k: int,
    cond: TextCond,
    ref: torch.Tensor | None,
    sde: SDEConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob (with grad) of the recorded transition k under the current policy: (logp, mean,
    std)."""
    x, sig, sig_next = traj.states[:, k], traj.sigmas[:, k], traj.sigmas_next[:, k]
    v = model.velocity(x, sig.to(x.device), cond, ref)
    _, logp, mean, std = sde_step_with_logprob(
        v,
        x,
        sig.to(x.device),
        sig_next.to(x.device),
        noise_level=sde.noise_level,
        prev_sample=traj.next_states[:, k],
        sde_type=sde.sde_type,
        logprob_reduction=sde.logprob_reduction,
    )
    return logp, mean, std
