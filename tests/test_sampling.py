"""The denoising loop (ODE + SDE-with-log-prob steps) and FlowGRPO's recomputed log-probs.

Run on the tiny random-weight FLUX adapter. Expected values come from hand-written loops and
the formulas of design.md §4 written out here, not from `r3rl.algos.flow_grpo`.
"""

from __future__ import annotations

import math

import pytest
import torch

from r3rl.models.flux import FluxModel
from r3rl.sampling import SDEConfig, Trajectory, sample, transition_logprob
from r3rl.shapes.tiny_diffusion import build_tiny_flux

TEXTS = ["a red circle above a blue square", "two green triangles", "a yellow star"]
SIGMAS = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0])  # 4 steps, deliberately uneven
B, N, C = 3, 16, 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(tokenizer) -> FluxModel:
    m = build_tiny_flux(tokenizer, 32, seed=0)
    for part in (m.transformer, m.vae, m.text_encoder, m.text_encoder_2):
        part.eval().requires_grad_(False)
    return m


def start(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)


def one_step_mask(steps: list[int], num_steps: int = 4) -> torch.Tensor:
    mask = torch.zeros(len(steps), num_steps, dtype=torch.bool)
    mask[torch.arange(len(steps)), torch.tensor(steps)] = True
    return mask


def hand_transition(v, x, s: float, s_next: float, a: float, kind: str):
    """Mean and std of x_next (design.md §4), written out independently; at σ = 1 the noise
    level's denominator takes the next σ (flow_grpo's scheduler.sigmas[1]), so it stays finite."""
    v, x = v.double(), x.double()
    if kind == "sde":
        dt = s_next - s
        sig_t = a * math.sqrt(s / (1 - (s_next if s == 1 else s)))
        mean = x * (1 + sig_t**2 / (2 * s) * dt) + v * (1 + sig_t**2 * (1 - s) / (2 * s)) * dt
        std = sig_t * math.sqrt(-dt)
    else:  # cps: re-noise the predicted x0 to σ_next with fresh noise of std σ_next·sin(aπ/2)
        std = s_next * math.sin(a * math.pi / 2)
        x0, x1 = x - s * v, x + (1 - s) * v
        mean = x0 * (1 - s_next) + x1 * math.sqrt(s_next**2 - std**2)
    return mean, std


def hand_logp(x_next, mean, std: float) -> torch.Tensor:
    """Gaussian log-density averaged over every non-batch element."""
    d = (
        -((x_next.double() - mean) ** 2) / (2 * std**2)
        - math.log(std)
        - 0.5 * math.log(2 * math.pi)
    )
    return d.flatten(1).mean(1)


# ---------------------------------------------------------------------- ODE


def test_all_false_mask_is_plain_euler(model):
    cond = model.encode_text(TEXTS)
    x0, ref = start()
    mask = torch.zeros(B, 4, dtype=torch.bool)
    for r in (None, ref):
        traj = sample(model, cond, r, SIGMAS, mask, SDEConfig(), x=x0.clone())
        x = x0.clone()
        with torch.no_grad():
            for i in range(4):
                v = model.velocity(x, torch.full((B,), float(SIGMAS[i])), cond, r)
                x = x + v * (float(SIGMAS[i + 1]) - float(SIGMAS[i]))
        assert torch.allclose(traj.latents, x, atol=1e-5)
        assert traj.states.shape == traj.next_states.shape == (B, 0, N, C)
        assert traj.sigmas.shape == traj.sigmas_next.shape == traj.logps.shape == (B, 0)
    # the reference conditions the result (Kontext edit vs text-to-image)
    t2i = sample(model, cond, None, SIGMAS, mask, SDEConfig(), x=x0.clone()).latents
    assert (t2i - traj.latents).abs().max() > 1e-3


def test_noise_comes_from_the_generator(model):
    cond = model.encode_text(TEXTS)
    mask = one_step_mask([1, 1, 1])
    a = sample(
        model, cond, None, SIGMAS, mask, SDEConfig(), generator=torch.Generator().manual_seed(7)
    )
    b = sample(
        model, cond, None, SIGMAS, mask, SDEConfig(), generator=torch.Generator().manual_seed(7)
    )
    for f in Trajectory.__dataclass_fields__:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    # x=None draws the starting noise from the generator through model.noise
    g = torch.Generator().manual_seed(7)
    x0 = model.noise(B, g)
    c = sample(model, cond, None, SIGMAS, mask, SDEConfig(), generator=g, x=x0)
    assert torch.equal(a.latents, c.latents)
    d = sample(
        model, cond, None, SIGMAS, mask, SDEConfig(), generator=torch.Generator().manual_seed(8)
    )
    assert not torch.allclose(a.latents, d.latents)


# ---------------------------------------------------------------------- SDE steps


def test_one_sde_step_per_row_records_the_right_transition(model):
    cond = model.encode_text(TEXTS)
    x0, ref = start(1)
    steps = [2, 0, 3]  # a different step for every row, the last one included
    sde = SDEConfig(noise_level=0.9)
    traj = sample(
        model,
        cond,
        ref,
        SIGMAS,
        one_step_mask(steps),
        sde,
        generator=torch.Generator().manual_seed(0),
        x=x0.clone(),
    )
    assert traj.states.shape == traj.next_states.shape == (B, 1, N, C)
    assert traj.logps.shape == traj.sigmas.shape == traj.sigmas_next.shape == (B, 1)
    assert traj.next_states.dtype == torch.float32

    # re-run by hand: Euler everywhere, except that a row's recorded SDE action replaces the
    # Euler step at its chosen step; the recorded state/σ/log-prob must match at that step
    x = x0.clone()
    with torch.no_grad():
        for i in range(4):
            s, s_next = float(SIGMAS[i]), float(SIGMAS[i + 1])
            v = model.velocity(x, torch.full((B,), s), cond, ref)
            x_new = x + v * (s_next - s)
            for r in range(B):
                if steps[r] != i:
                    continue
                assert torch.allclose(traj.states[r, 0], x[r], atol=1e-5)
                assert traj.sigmas[r, 0].item() == pytest.approx(s)
                assert traj.sigmas_next[r, 0].item() == pytest.approx(s_next)
                mean, std = hand_transition(v[r : r + 1], x[r : r + 1], s, s_next, 0.9, "sde")
                action = traj.next_states[r, 0]
                assert traj.logps[r, 0].item() == pytest.approx(
                    hand_logp(action[None], mean, std).item(), abs=1e-5
                )
                z = (action.double() - mean[0]) / std  # the injected noise looks standard normal
                assert abs(z.mean().item()) < 0.2 and abs(z.std().item() - 1) < 0.15
                x_new[r] = action
            x = x_new
    assert torch.allclose(traj.latents, x, atol=1e-5)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_transition_logprob_reproduces_behaviour_logps(model, sde_type):
    """FlowGRPO's invariant: with no update in between, the recomputed log-prob of each recorded
    transition equals the behaviour log-prob (ratio exactly 1), with true CFG and a reference."""
    model.true_cfg_scale, model.negative_prompt = 2.5, "blurry"
    cond = model.encode_text(TEXTS)
    x0, ref = start(2)
    mask = torch.zeros(B, 4, dtype=torch.bool)
    firsts = [1, 0, 2] if sde_type == "sde" else [1, 0, 1]  # cps never trains its std=0 last step
    for r, first in enumerate(firsts):  # windows of 2 steps
        mask[r, first : first + 2] = True
    sde = SDEConfig(noise_level=0.8, sde_type=sde_type)
    traj = sample(
        model, cond, ref, SIGMAS, mask, sde, generator=torch.Generator().manual_seed(1), x=x0
    )
    assert traj.logps.shape == (B, 2) and torch.isfinite(traj.logps).all()
    steps = torch.tensor([[f, f + 1] for f in firsts])
    assert torch.equal(traj.sigmas, SIGMAS[steps]) and torch.equal(
        traj.sigmas_next, SIGMAS[steps + 1]
    )
    model.transformer.requires_grad_(True)
    for k in range(2):
        logp, mean, std = transition_logprob(model, traj, k, cond, ref, sde)
        assert logp.shape == (B,) and mean.shape == (B, N, C) and std.shape == (B,)
        assert torch.allclose(logp, traj.logps[:, k], atol=1e-5, rtol=0)
        with torch.no_grad():
            for r in range(B):
                s, s_next = traj.sigmas[r, k].item(), traj.sigmas_next[r, k].item()
                v = model.velocity(
                    traj.states[r : r + 1, k],
                    torch.tensor([s]),
                    cond.index(slice(r, r + 1)),
                    ref[r : r + 1],
                )
                m_hand, std_hand = hand_transition(
                    v, traj.states[r : r + 1, k], s, s_next, 0.8, sde_type
                )
                assert std[r].item() == pytest.approx(std_hand, rel=1e-5)
                assert torch.allclose(mean[r].double(), m_hand[0], atol=1e-5)
    # the recomputed log-prob carries the policy's gradient
    logp.sum().backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.transformer.parameters()
    )
    # and it is the log-prob of the *guided* velocity: without CFG the ratio is far from 1
    model.true_cfg_scale = 1.0
    with torch.no_grad():
        unguided, _, _ = transition_logprob(model, traj, 0, cond, ref, sde)
    assert (unguided - traj.logps[:, 0]).abs().max() > 1e-3


def test_transition_logprob_on_a_sub_batch(model):
    cond = model.encode_text(TEXTS)
    x0, ref = start(3)
    traj = sample(
        model,
        cond,
        ref,
        SIGMAS,
        one_step_mask([3, 1, 0]),
        SDEConfig(),
        generator=torch.Generator().manual_seed(2),
        x=x0,
    )
    idx = torch.tensor([2, 0])
    with torch.no_grad():
        logp, _, _ = transition_logprob(
            model, traj.index(idx), 0, cond.index(idx), ref[idx], SDEConfig()
        )
    assert torch.allclose(logp, traj.logps[idx, 0], atol=1e-5, rtol=0)


def test_rows_must_train_the_same_number_of_steps(model):
    cond = model.encode_text(TEXTS)
    mask = torch.zeros(B, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 1] = mask[1, 2] = mask[2, 0] = True
    with pytest.raises(ValueError, match="same number"):
        sample(model, cond, None, SIGMAS, mask, SDEConfig(), x=torch.zeros(B, N, C))
    # a mask longer than the schedule would silently mis-assign transitions to rows
    long_mask = torch.zeros(B, 5, dtype=torch.bool)
    long_mask[:, 4] = True
    with pytest.raises(ValueError, match="sde_mask"):
        sample(model, cond, None, SIGMAS, long_mask, SDEConfig(), x=torch.zeros(B, N, C))


def test_cps_refuses_to_train_the_last_step(model):
    """cps's std is σ_next·sin(aπ/2) = 0 on the step ending at σ = 0: its log-prob is NaN."""
    cond = model.encode_text(TEXTS)
    with pytest.raises(ValueError, match="cps"):
        sample(
            model,
            cond,
            None,
            SIGMAS,
            one_step_mask([3, 0, 1]),
            SDEConfig(sde_type="cps"),
            x=torch.zeros(B, N, C),
        )
    # the plain SDE has std σ_t·sqrt(σ) > 0 there and may train it (checked above)


# ---------------------------------------------------------------------- Trajectory


def make_traj(b: int, k: int, offset: float) -> Trajectory:
    arange = lambda *shape: torch.arange(math.prod(shape), dtype=torch.float32).view(shape) + offset
    return Trajectory(
        arange(b, 2, 3),
        arange(b, k, 2, 3) + 0.1,
        arange(b, k, 2, 3) + 0.2,
        arange(b, k) + 0.3,
        arange(b, k) + 0.4,
        arange(b, k) + 0.5,
    )


def test_trajectory_index_and_cat():
    a, b = make_traj(3, 2, 0.0), make_traj(2, 2, 100.0)
    fields = list(Trajectory.__dataclass_fields__)
    assert fields == ["latents", "states", "next_states", "sigmas", "sigmas_next", "logps"]
    sub = a.index(torch.tensor([2, 0]))
    for f in fields:
        assert torch.equal(getattr(sub, f), torch.stack([getattr(a, f)[2], getattr(a, f)[0]])), f
    sl = a.index(slice(1, 3))
    for f in fields:
        assert torch.equal(getattr(sl, f), getattr(a, f)[1:3]), f
    both = Trajectory.cat([a, b])
    assert (
        both.latents.shape == (5, 2, 3)
        and both.states.shape == (5, 2, 2, 3)
        and both.logps.shape == (5, 2)
    )
    for f in fields:
        assert torch.equal(getattr(both.index(slice(0, 3)), f), getattr(a, f)), f
        assert torch.equal(getattr(both.index(slice(3, 5)), f), getattr(b, f)), f
