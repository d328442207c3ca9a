"""FlowGRPO math against values worked out by hand (σ=0.8 → 0.6, a=0.7 unless stated)."""

import math

import pytest
import torch

from r3rl.algos.flow_grpo import (
    flow_grpo_loss,
    ode_step,
    sde_noise_std,
    sde_step_with_logprob,
    select_train_timesteps,
    sigma_schedule,
)

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gauss_logpdf(x: float, mu: float, std: float) -> float:
    return -((x - mu) ** 2) / (2 * std**2) - math.log(std) - HALF_LOG_2PI


# σ=0.8, σ_next=0.6, a=0.7: dt=-0.2, σ_t = 0.7·sqrt(0.8/0.2) = 1.4, σ_t² = 1.96
# x coefficient: 1 + 1.96/1.6·(-0.2) = 0.755; v coefficient: (1 + 1.96·0.2/1.6)·(-0.2) = -0.249
# std = 1.4·sqrt(0.2), std² = 0.392
STD_08 = 1.4 * math.sqrt(0.2)
X = [1.0, -2.0]
V = [0.5, 1.0]
MU_08 = [0.755 * 1.0 - 0.249 * 0.5, 0.755 * -2.0 - 0.249 * 1.0]  # [0.6305, -1.759]


def test_sde_step_mean_std_and_logprob_of_given_sample():
    x, v = torch.tensor([X]), torch.tensor([V])
    prev = torch.tensor([[0.9, -1.5]])
    out, logp, mean, std = sde_step_with_logprob(v, x, 0.8, 0.6, noise_level=0.7, prev_sample=prev)
    assert torch.equal(out, prev)
    assert mean[0].tolist() == pytest.approx(MU_08, abs=1e-6)
    assert std.tolist() == pytest.approx([STD_08], rel=1e-6)
    expected = (gauss_logpdf(0.9, MU_08[0], STD_08) + gauss_logpdf(-1.5, MU_08[1], STD_08)) / 2
    assert logp.shape == (1,)
    assert logp.item() == pytest.approx(expected, rel=1e-6)


def test_sum_reduction_is_mean_times_element_count():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    prev, mean_lp, _, _ = sde_step_with_logprob(
        v, x, 0.8, 0.6, generator=torch.Generator().manual_seed(0)
    )
    _, sum_lp, _, _ = sde_step_with_logprob(
        v, x, 0.8, 0.6, prev_sample=prev, logprob_reduction="sum"
    )
    assert torch.allclose(sum_lp, mean_lp * 48, rtol=1e-5)


def test_per_sample_tensor_sigmas():
    # row 2: σ=0.5 → 0.25, dt=-0.25, σ_t = 0.7·sqrt(0.5/0.5) = 0.7, σ_t² = 0.49
    # x coef 1 + 0.49/1.0·(-0.25) = 0.8775; v coef (1 + 0.49·0.5/1.0)·(-0.25) = -0.31125; std 0.7·0.5
    x = torch.tensor([X, X])
    v = torch.tensor([V, V])
    prev = torch.tensor([[0.9, -1.5], [0.5, -2.0]])
    _, logp, mean, std = sde_step_with_logprob(
        v, x, torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.25]), prev_sample=prev
    )
    mu2 = [0.8775 * 1.0 - 0.31125 * 0.5, 0.8775 * -2.0 - 0.31125 * 1.0]
    assert mean[0].tolist() == pytest.approx(MU_08, abs=1e-6)
    assert mean[1].tolist() == pytest.approx(mu2, abs=1e-6)
    assert std.tolist() == pytest.approx([STD_08, 0.35], rel=1e-6)
    lp2 = (gauss_logpdf(0.5, mu2[0], 0.35) + gauss_logpdf(-2.0, mu2[1], 0.35)) / 2
    assert logp[1].item() == pytest.approx(lp2, abs=1e-6)


def test_sigma_one_takes_the_next_sigma():
    # σ=1: flow_grpo takes the grid's next σ: σ_t = 0.7·sqrt(1/(1-0.9)); std = σ_t·sqrt(0.1) (R3's cap: sigma_cap)
    std = sde_noise_std(torch.tensor([1.0]), torch.tensor([0.9]), 0.7)
    assert std.item() == pytest.approx(0.7 * math.sqrt(10) * math.sqrt(0.1), rel=1e-6)
    capped = sde_noise_std(torch.tensor([1.0]), torch.tensor([0.9]), 0.7, sigma_cap=0.95)
    assert capped.item() == pytest.approx(0.7 * math.sqrt(20) * math.sqrt(0.1), rel=1e-6)
    _, logp, mean, _ = sde_step_with_logprob(torch.ones(1, 2), torch.ones(1, 2), 1.0, 0.9)
    assert torch.isfinite(logp).all() and torch.isfinite(mean).all()


def test_cps_step():
    # std = 0.6·sin(0.35π); x0 = x - 0.8v; x1 = x + 0.2v; μ = 0.4·x0 + x1·sqrt(0.36 - std²)
    s = 0.6 * math.sin(0.7 * math.pi / 2)
    root = math.sqrt(0.36 - s * s)
    mu = [0.4 * (x - 0.8 * v) + (x + 0.2 * v) * root for x, v in zip(X, V)]
    prev = torch.tensor([[0.7, -1.0]])
    _, logp, mean, std = sde_step_with_logprob(
        torch.tensor([V]), torch.tensor([X]), 0.8, 0.6, prev_sample=prev, sde_type="cps"
    )
    assert mean[0].tolist() == pytest.approx(mu, abs=1e-6)
    assert std.item() == pytest.approx(s, rel=1e-6)
    expected = (gauss_logpdf(0.7, mu[0], s) + gauss_logpdf(-1.0, mu[1], s)) / 2
    assert logp.item() == pytest.approx(expected, rel=1e-6)


def test_sampling_has_the_stated_mean_and_std():
    n = 200_000
    x, v = torch.full((1, n), 1.0), torch.full((1, n), 0.5)
    prev, logp, _, _ = sde_step_with_logprob(
        v, x, 0.8, 0.6, generator=torch.Generator().manual_seed(0)
    )
    assert prev.mean().item() == pytest.approx(MU_08[0], abs=4 * STD_08 / math.sqrt(n))
    assert prev.std().item() == pytest.approx(STD_08, rel=0.01)
    # E[log N(x; μ, s)] for x ~ N(μ, s) is -1/2 - log s - log sqrt(2π)
    assert logp.item() == pytest.approx(-0.5 - math.log(STD_08) - HALF_LOG_2PI, abs=0.01)


def test_ode_limit_is_the_euler_step():
    x, v = torch.tensor([X]), torch.tensor([V])
    euler = [1.0 + 0.5 * -0.2, -2.0 + 1.0 * -0.2]
    assert ode_step(v, x, 0.8, 0.6)[0].tolist() == pytest.approx(euler, abs=1e-6)
    _, _, mean, _ = sde_step_with_logprob(v, x, 0.8, 0.6, noise_level=0.0)
    assert mean[0].tolist() == pytest.approx(euler, abs=1e-6)
    prev, _, _, _ = sde_step_with_logprob(
        v, x, 0.8, 0.6, noise_level=1e-5, generator=torch.Generator().manual_seed(0)
    )
    assert prev[0].tolist() == pytest.approx(euler, abs=1e-4)


def test_bf16_inputs_are_computed_in_float32():
    x, v = torch.tensor([X], dtype=torch.bfloat16), torch.tensor([V], dtype=torch.bfloat16)
    prev, logp, mean, std = sde_step_with_logprob(
        v, x, 0.8, 0.6, generator=torch.Generator().manual_seed(0)
    )
    assert {prev.dtype, logp.dtype, mean.dtype, std.dtype} == {torch.float32}
    assert mean[0].tolist() == pytest.approx(MU_08, abs=1e-6)  # X and V are exact in bf16


def test_per_sample_generators_make_noise_independent_of_batch_position():
    x, v = torch.zeros(2, 5), torch.zeros(2, 5)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    a, _, _, _ = sde_step_with_logprob(v, x, 0.8, 0.6, generator=gens([1, 2]))
    b, _, _, _ = sde_step_with_logprob(v, x, 0.8, 0.6, generator=gens([2, 1]))
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])


def test_sigma_schedule_with_shift():
    assert sigma_schedule(4).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    # shift 3: 3s/(1+2s) at s = .75, .5, .25 → 2.25/2.5, 1.5/2, .75/1.5
    assert sigma_schedule(4, shift=3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


def test_flow_grpo_loss_clips_ratios_and_advantages():
    old = torch.zeros(3)
    logp = torch.tensor([0.0, 2e-4, -2e-4], requires_grad=True)
    adv = torch.tensor([1.0, 2.0, -7.0])  # -7 is clipped to -5
    loss, m = flow_grpo_loss(logp, old, adv, clip_range=1e-4, adv_clip_max=5.0)
    # sample 0: ratio 1 → -1; sample 1: A>0, ratio e^2e-4 > 1+1e-4 → -2·1.0001;
    # sample 2: A=-5, ratio e^-2e-4 < 1-1e-4 → 5·0.9999
    assert loss.item() == pytest.approx((-1.0 - 2 * 1.0001 + 5 * 0.9999) / 3, rel=1e-5)
    assert m["clip_ratio"] == pytest.approx(2 / 3)
    assert m["approx_kl"] == pytest.approx(0.5 * (2 * (2e-4) ** 2) / 3, rel=1e-3)
    assert m["ratio_mean"] == pytest.approx((1 + math.exp(2e-4) + math.exp(-2e-4)) / 3, rel=1e-6)
    assert "kl" not in m
    loss.backward()
    # only the unclipped sample has a gradient: d(-A·ratio/3)/dlogp = -1·1/3
    assert logp.grad.tolist() == pytest.approx([-1 / 3, 0.0, 0.0], abs=1e-7)


def test_flow_grpo_kl_on_transition_means():
    mean = torch.tensor([[0.1, 0.3], [0.0, 0.2]])
    ref = torch.zeros(2, 2)
    std = torch.tensor([0.5, 1.0])
    # per element Δ²/(2 std²): row 0: .01/.5=.02, .09/.5=.18 → mean .1; row 1: 0, .04/2=.02 → mean .01
    zeros = torch.zeros(2)
    loss, m = flow_grpo_loss(
        zeros, zeros, zeros, prev_mean=mean, ref_prev_mean=ref, std=std, beta=0.5
    )
    assert m["kl"] == pytest.approx(0.055, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * 0.055, rel=1e-6)
    _, m_sum = flow_grpo_loss(
        zeros, zeros, zeros, prev_mean=mean, ref_prev_mean=ref, std=std, reduction="sum"
    )
    assert m_sum["kl"] == pytest.approx(0.11, rel=1e-6)
    with pytest.raises(ValueError):
        flow_grpo_loss(zeros, zeros, zeros, beta=0.1)


def test_select_one_and_subset_are_random_per_sample():
    g = torch.Generator().manual_seed(0)
    one = select_train_timesteps(10, 200, "one", generator=g)
    assert one.shape == (200, 10) and one.dtype == torch.bool
    assert (one.sum(1) == 1).all()
    assert one.any(0).all()  # every step gets picked by some sample
    sub = select_train_timesteps(10, 200, "subset", k=3, generator=g)
    assert (sub.sum(1) == 3).all() and len({tuple(r.tolist()) for r in sub}) > 1


def test_select_respects_max_index():
    g = torch.Generator().manual_seed(0)
    one = select_train_timesteps(10, 100, "one", max_index=2, generator=g)
    assert not one[:, 2:].any() and one[:, 0].any() and one[:, 1].any()
    assert (
        select_train_timesteps(4, 2, "all", max_index=3).tolist() == [[True, True, True, False]] * 2
    )
    assert select_train_timesteps(4, 2, "all").all()


def test_select_window_is_contiguous_and_random():
    win = select_train_timesteps(
        10, 200, "window", window=3, generator=torch.Generator().manual_seed(0)
    )
    assert (win.sum(1) == 3).all()
    starts = win.int().argmax(1)
    for row, s in zip(win, starts.tolist()):
        assert row[s : s + 3].all()
    assert set(starts.tolist()) == set(range(8))  # every start 0..7 occurs


def test_select_rejects_bad_arguments():
    with pytest.raises(ValueError):
        select_train_timesteps(10, 2, "subset")
    with pytest.raises(ValueError):
        select_train_timesteps(10, 2, "window", window=3, max_index=2)
    with pytest.raises(ValueError):
        select_train_timesteps(10, 2, "every")
