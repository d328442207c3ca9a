"""GRPO text math: log-probs of the sampled distribution and the clipped loss, worked by hand."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from r3rl.algos.grpo import grpo_loss, k3_kl, token_logprobs

LN = math.log
INF = float("inf")


def test_top_k_filters_and_renormalises():
    # logits [4,2,0,-2] at T=2 → [2,1,0,-1]; top-2 keeps {2,1}: p = [e/(e+1), 1/(e+1)]
    logits = torch.tensor([[[4.0, 2.0, 0.0, -2.0]] * 4])
    tokens = torch.tensor([[0, 1, 2, 3]])
    logps, entropy = token_logprobs(logits, tokens, temperature=2.0, top_k=2)
    p0, p1 = math.e / (math.e + 1), 1 / (math.e + 1)
    assert logps[0, :2].tolist() == pytest.approx([LN(p0), LN(p1)], rel=1e-6)
    assert logps[0, 2:].tolist() == [-INF, -INF]
    assert entropy[0].tolist() == pytest.approx([-(p0 * LN(p0) + p1 * LN(p1))] * 4, rel=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probs .5 .3 .15 .05; ascending cumulative .05 .2 .5 1 → drop cum ≤ 1-.75 = .25 → keep .5, .3
    logits = torch.tensor([[[LN(0.5), LN(0.3), LN(0.15), LN(0.05)]] * 2])
    logps, entropy = token_logprobs(logits, torch.tensor([[0, 2]]), top_p=0.75)
    assert logps[0, 0].item() == pytest.approx(LN(0.5 / 0.8), rel=1e-6)
    assert logps[0, 1].item() == -INF
    assert entropy[0, 0].item() == pytest.approx(-(0.625 * LN(0.625) + 0.375 * LN(0.375)), rel=1e-6)


def test_matches_the_distribution_hf_generate_samples_from():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 3
    flat = logits.reshape(15, 50)
    for warp in (TemperatureLogitsWarper(0.9), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        flat = warp(None, flat)
    # sampled tokens (in the support) in the first 4 columns, arbitrary tokens in the last
    tokens = torch.multinomial(flat.softmax(-1), 1, generator=g).reshape(3, 5)
    tokens[:, -1] = torch.randint(0, 50, (3,), generator=g)
    expected = torch.log_softmax(flat, -1).gather(-1, tokens.reshape(15, 1)).reshape(3, 5)
    assert torch.isfinite(expected).sum() >= 12 and torch.isinf(expected).any()
    logps, _ = token_logprobs(logits, tokens, temperature=0.9, top_k=10, top_p=0.8)
    assert torch.equal(torch.isinf(logps), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert torch.allclose(logps[finite], expected[finite], atol=1e-5)


# 2×3 example, second row has a padded last token. Ratios: row0 [1, 1.5, 0.5], row1 [1.5, 0.5, pad].
# A = [1, -2], ε = 0.2 / 0.28. Per-token loss -min(r·A, clip(r)·A):
#   row0: r=1 → -1; r=1.5 clipped to 1.28 → -1.28; r=.5 (A>0, not clipped) → -0.5        sum -2.78
#   row1: r=1.5 (A<0, not clipped) → 3; r=.5 clipped to .8 → 1.6                          sum 4.6
LOGPS = torch.tensor([[0.0, LN(1.5), LN(0.5)], [LN(1.5), LN(0.5), 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, -2.0])


def _loss(loss_type, **kw):
    logps = LOGPS.clone().requires_grad_(True)
    old = torch.zeros(2, 3)
    old[1, 2] = -INF  # garbage under the mask must not leak
    loss, metrics = grpo_loss(logps, old, ADV, MASK, loss_type=loss_type, **kw)
    return loss, metrics, logps


def test_grpo_aggregation_is_mean_of_sequence_means():
    loss, _, logps = _loss("grpo")
    assert loss.item() == pytest.approx((-2.78 / 3 + 4.6 / 2) / 2, rel=1e-6)
    loss.backward()
    # unclipped tokens: d(-A·r)/dlogp / (n_tokens·B) = -A·r / (n·2); clipped tokens: 0
    expected = [[-1 / 6, 0.0, -0.5 / 6], [2 * 1.5 / 4, 0.0, 0.0]]
    assert torch.allclose(logps.grad, torch.tensor(expected), atol=1e-6)


def test_dapo_aggregation_is_token_mean_over_batch():
    loss, _, _ = _loss("dapo")
    assert loss.item() == pytest.approx(1.82 / 5, rel=1e-6)


def test_dr_grpo_aggregation_uses_constant_normaliser():
    loss, _, _ = _loss("dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx(1.82 / 8, rel=1e-6)
    loss, _, _ = _loss("dr_grpo")
    assert loss.item() == pytest.approx(1.82 / 6, rel=1e-6)


def test_clip_metrics_follow_trl():
    _, m, _ = _loss("grpo")
    # low: r < .8 with A < 0 → row1 token1; high: r > 1.28 with A > 0 → row0 token1; of 5 tokens
    assert m["clip_ratio/low_mean"] == pytest.approx(1 / 5)
    assert m["clip_ratio/high_mean"] == pytest.approx(1 / 5)
    assert m["clip_ratio/region_mean"] == pytest.approx(2 / 5)
    assert m["ratio_mean"] == pytest.approx((1 + 1.5 + 0.5 + 1.5 + 0.5) / 5, rel=1e-6)
    assert "kl" not in m


def test_k3_kl_term():
    # ref − logp = ln 2 on every token → k3 = 2 − ln 2 − 1
    k3 = 1 - LN(2)
    assert k3_kl(torch.tensor([0.0]), torch.tensor([LN(2)])).item() == pytest.approx(k3, rel=1e-6)
    ref = LOGPS + LN(2)
    ref[1, 2] = INF
    loss, m, _ = _loss("dapo", ref_logps=ref, beta=0.1)
    assert m["kl"] == pytest.approx(k3, rel=1e-5)
    assert loss.item() == pytest.approx(1.82 / 5 + 0.1 * k3, rel=1e-5)


def test_masked_garbage_keeps_loss_and_grads_finite():
    logps = torch.tensor([[0.0, -INF], [float("nan"), 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    loss, _ = grpo_loss(
        logps,
        torch.zeros(2, 2),
        torch.tensor([1.0, -1.0]),
        mask,
        ref_logps=torch.zeros(2, 2),
        beta=0.1,
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        grpo_loss(LOGPS, LOGPS, ADV, MASK, loss_type="bnpo")
    with pytest.raises(ValueError):
        grpo_loss(LOGPS, LOGPS, ADV, MASK, beta=0.1)


def test_importance_weights_scale_the_policy_term_per_token_not_the_kl():
    """TRL's vllm_importance_sampling_correction: per_token_loss *= is_ratio before the KL is added."""
    logps = torch.tensor([[LN(0.5), LN(0.25), 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    adv = torch.tensor([2.0])
    weights = torch.tensor([[1.5, 0.5, 7.0]])  # the padding's weight is ignored
    ref = logps.detach() + LN(2)
    loss, m = grpo_loss(logps, logps.detach(), adv, mask, is_weights=weights, ref_logps=ref, beta=0.1,
                        loss_type="dapo")  # fmt: skip
    k3 = 1 - LN(2)  # per token, unweighted
    # on-policy ratio 1: policy term -adv per token, weighted 1.5 and 0.5
    assert loss.item() == pytest.approx((-2.0 * 1.5 - 2.0 * 0.5) / 2 + 0.1 * k3, rel=1e-6)
    loss.backward()
    # d/dlogp of -ratio*adv*w is -adv*w (ratio 1); the KL's gradient is unweighted
    kl_grad = 0.1 * (1 - math.exp(LN(2))) / 2  # d k3/d logp = 1 - exp(ref - logp), over 2 tokens
    assert logps.grad[0, :2].tolist() == pytest.approx([-3.0 / 2 + kl_grad, -1.0 / 2 + kl_grad], rel=1e-6)
    unweighted, _ = grpo_loss(logps, logps.detach(), adv, mask, loss_type="dapo")
    assert unweighted.item() == pytest.approx(-2.0)
