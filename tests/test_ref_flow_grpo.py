"""r3rl's SDE step and image KL against the references' own code, written out here (issue 17, items 1 and 3).

- flow_grpo (yifan123/flow_grpo, `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`): the step reads
  σ and σ_prev from a real `FlowMatchEulerDiscreteScheduler` after `set_timesteps` and uses σ as it is
  in the noise level, except σ = 1, where it takes `scheduler.sigmas[1]`;
  `scripts/train_sd3.py`: `kl_loss = ((μ − μ_ref)**2).mean(dim=(1,2,3), keepdim=True) / (2 * std_dev_t**2)`
  with `std_dev_t` the noise level σ_t the step returns, then `torch.mean`.
- R3 (sen-ye/R3, `modeling/diffusion/sde_sampler.py`): η(t) = η0·sqrt(t / (1 − where(t ≥ 0.95, 0.95, t))),
  std = η·sqrt(dt), `kl_divergence = mean((μ − μ_ref)**2 / std_ref**2)` over the non-batch dims.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from r3rl.algos.flow_grpo import flow_grpo_loss, image_kl, kl_std, sde_noise_level, sde_step_with_logprob


def flow_grpo_sde_step(scheduler, model_output, timestep, sample, noise_level=0.7, prev_sample=None, noise=None):
    """flow_grpo's `sde_step_with_logprob` (SD3), line for line; `noise` replaces its randn_tensor draw."""
    model_output, sample = model_output.float(), sample.float()
    step_index = [scheduler.index_for_timestep(t) for t in timestep]
    prev_step_index = [step + 1 for step in step_index]
    sigma = scheduler.sigmas[step_index].view(-1, 1, 1, 1)
    sigma_prev = scheduler.sigmas[prev_step_index].view(-1, 1, 1, 1)
    sigma_max = scheduler.sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = (sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
                        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    if prev_sample is None:
        prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * noise
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
        - torch.log(std_dev_t * torch.sqrt(-1 * dt))
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def flow_grpo_kl(prev_sample_mean, prev_sample_mean_ref, std_dev_t):
    """flow_grpo's `train_sd3.py` KL term (before `config.train.beta *`)."""
    kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)
    return torch.mean(kl_loss)


def r3_eta(t, constant_eta):
    """R3's `SDESampler.get_eta`, eta_mode='monotonic'."""
    return torch.sqrt(t / (1 - torch.where(t >= 0.95, 0.95, t))) * constant_eta


def sd3_scheduler(num_steps: int) -> FlowMatchEulerDiscreteScheduler:
    """SD3.5-medium's scheduler (shift 3), set up as StableDiffusion3Pipeline does: no sigmas passed."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    return scheduler


@pytest.mark.parametrize("num_steps", [10, 40])
@pytest.mark.parametrize("noise_level", [0.7, 1.0])
def test_sde_step_is_flow_grpos_on_every_step_of_the_sd3_grid(num_steps, noise_level):
    """Item 1: every step of a real scheduler's grid, σ = 1 included, gives flow_grpo's sample, mean,
    log-prob and noise level (with σ near 1 r3rl used to cap σ at 0.95: 0.89x the std at σ = .960)."""
    scheduler = sd3_scheduler(num_steps)
    sigmas = scheduler.sigmas
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 6, 6)
    for i in range(num_steps):
        x, v, noise = (torch.randn(shape, generator=g) for _ in range(3))
        timestep = scheduler.timesteps[i].repeat(2)
        ref_next, ref_logp, ref_mean, ref_std_dev_t = flow_grpo_sde_step(
            scheduler, v, timestep, x, noise_level, noise=noise)
        sigma, sigma_next = sigmas[i].repeat(2), sigmas[i + 1].repeat(2)
        nxt, logp, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, noise_level, prev_sample=ref_next)
        assert torch.allclose(mean, ref_mean, rtol=1e-5, atol=1e-5), i
        assert torch.allclose(logp, ref_logp, rtol=1e-5, atol=1e-5), i
        assert torch.allclose(std, ref_std_dev_t.flatten() * torch.sqrt(sigma - sigma_next), rtol=1e-5), i
        assert torch.allclose(kl_std(std, sigma, sigma_next), ref_std_dev_t.flatten(), rtol=1e-5), i
        # sampling (no prev_sample): the same draw gives the same x_next
        mine = mean + std.view(-1, 1, 1, 1) * noise
        assert torch.allclose(mine, ref_next, rtol=1e-5, atol=1e-5), i


def test_the_old_cap_was_what_the_issue_measured_and_r3s_cap_is_still_there():
    """The numbers issue 17 measured on SD3's 10-step grid: step 1 (σ = .960) had 0.893x flow_grpo's std
    under the 0.95 cap. `sigma_cap=0.95` is R3's monotonic η, written out above."""
    sigmas = sd3_scheduler(10).sigmas
    assert float(sigmas[1]) == pytest.approx(0.960, abs=5e-4)
    capped = sde_noise_level(sigmas[1:2], 0.7, sigma_cap=0.95)
    exact = sde_noise_level(sigmas[1:2], 0.7, sigma_next=sigmas[2:3])
    assert float(capped / exact) == pytest.approx(0.893, abs=1e-3)
    for t in sigmas[:-1]:
        t = t.reshape(1)
        assert torch.allclose(sde_noise_level(t, 0.7, sigma_cap=0.95), r3_eta(t, 0.7))
    with pytest.raises(ValueError, match="sigma_next"):
        sde_noise_level(torch.ones(1), 0.7)


@pytest.mark.parametrize("num_steps", [10, 40])
def test_image_kl_is_flow_grpos_and_r3s(num_steps):
    """Item 3: β·KL is flow_grpo's `beta * kl_loss` (kl_form 'flow_grpo', the default) and R3's
    `kl_weight_image * kl_divergence` (kl_form 'r3') for the same β, on every step of the grid."""
    scheduler = sd3_scheduler(num_steps)
    sigmas = scheduler.sigmas
    g = torch.Generator().manual_seed(1)
    shape = (3, 4, 5, 5)
    beta = 0.04
    for i in range(num_steps):
        x, v, v_ref = (torch.randn(shape, generator=g) for _ in range(3))
        v_ref = v + 0.1 * v_ref
        timestep = scheduler.timesteps[i].repeat(3)
        nxt, _, mean, std_dev_t = flow_grpo_sde_step(scheduler, v, timestep, x, 0.7, noise=torch.randn(shape, generator=g))
        _, _, mean_ref, _ = flow_grpo_sde_step(scheduler, v_ref, timestep, x, 0.7, prev_sample=nxt)
        sigma, sigma_next = sigmas[i].repeat(3), sigmas[i + 1].repeat(3)
        _, logp, ours_mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, prev_sample=nxt)
        _, _, ours_ref, _ = sde_step_with_logprob(v_ref, x, sigma, sigma_next, 0.7, prev_sample=nxt)
        adv = torch.zeros(3)  # policy term 0: the loss is the KL term alone
        loss, m = flow_grpo_loss(logp, logp, adv, prev_mean=ours_mean, ref_prev_mean=ours_ref, std=std,
                                 beta=beta, sigma=sigma, sigma_next=sigma_next)
        assert float(loss) == pytest.approx(float(beta * flow_grpo_kl(mean, mean_ref, std_dev_t)), rel=1e-4), i
        # R3: its std is η·sqrt(dt), the transition std; its KL has no 1/2
        r3 = torch.mean((mean - mean_ref) ** 2 / (std.view(-1, 1, 1, 1) ** 2), dim=(1, 2, 3)).mean()
        loss_r3, _ = flow_grpo_loss(logp, logp, adv, prev_mean=ours_mean, ref_prev_mean=ours_ref, std=std,
                                    beta=beta, sigma=sigma, sigma_next=sigma_next, kl_form="r3")
        assert float(loss_r3) == pytest.approx(float(beta * r3), rel=1e-4), i
        # the exact Gaussian KL is flow_grpo's times 1/(-dt)
        exact = image_kl(ours_mean, ours_ref, std, kl_form="exact").mean()
        assert float(exact) == pytest.approx(float(flow_grpo_kl(mean, mean_ref, std_dev_t) / (sigma - sigma_next)[0]),
                                             rel=1e-4)


def test_cps_kl_divides_by_the_transition_std():
    """flow_grpo's cps step returns std_dev_t = σ_prev·sin(a·π/2), the transition std, and its KL
    divides by 2·std_dev_t²."""
    g = torch.Generator().manual_seed(2)
    mean, ref = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    std_dev_t = 0.5 * math.sin(0.7 * math.pi / 2)
    kl = image_kl(mean, ref, torch.full((2,), std_dev_t), sde_type="cps").mean()
    assert float(kl) == pytest.approx(float(flow_grpo_kl(mean, ref, torch.tensor(std_dev_t))), rel=1e-5)


def test_without_sigmas_the_loss_warns_and_keeps_the_exact_kl():
    g = torch.Generator().manual_seed(3)
    mean, ref = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    z = torch.zeros(2)
    with pytest.warns(UserWarning, match="sigma"):
        loss, _ = flow_grpo_loss(z, z, z, prev_mean=mean, ref_prev_mean=ref, std=torch.full((2,), 0.3), beta=1.0)
    assert float(loss) == pytest.approx(float(((mean - ref) ** 2 / (2 * 0.09)).mean()), rel=1e-5)
