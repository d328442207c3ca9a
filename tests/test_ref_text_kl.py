"""kl/text is TRL's: k3 between the unfiltered log-softmax of the policy's logits and the reference's
(issue 17, item 7); the PPO ratio keeps the filtered (top-k / top-p) log-probs of the distribution sampled.

TRL 1.16 `GRPOTrainer`, written out: per-token log-probs are `selective_log_softmax(logits / temperature)`
for policy and reference alike (no top-k / top-p), `per_token_kl = exp(ref - lp) - (ref - lp) - 1`,
and the KL metric is its mean over completion tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from r3rl.algos.grpo import grpo_loss, token_logprobs
from r3rl.config import RewardSpec
from r3rl.models.tokenizer import train_chat_tokenizer
from r3rl.rewards import CombinedReward
from r3rl.text_grpo import CausalLMPolicy, TextGRPOSettings, grpo_step


def trl_logps(logits, ids, temperature):
    """TRL: logits / temperature, then the log-softmax of the chosen tokens (selective_log_softmax)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def trl_kl(per_token_logps, ref_per_token_logps):
    return torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1


def _batch(seed=0, b=3, t=5, v=40):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3
    ids = logits.argmax(-1)  # a sampled token lies inside any top-k / top-p set
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False
    return logits, ids, mask, g


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_kl_term_is_trls_and_zero_at_equal_weights(loss_type):
    logits, ids, mask, g = _batch()
    temperature, top_k, top_p = 0.9, 5, 0.8
    filtered, _ = token_logprobs(logits, ids, temperature=temperature, top_k=top_k, top_p=top_p)
    unfiltered, _ = token_logprobs(logits, ids, temperature=temperature, top_k=0, top_p=1.0)
    assert torch.allclose(unfiltered, trl_logps(logits, ids, temperature), atol=1e-5)
    adv = torch.tensor([1.0, -0.5, 0.2])
    kw = {"epsilon_low": 0.2, "epsilon_high": 0.28, "loss_type": loss_type}
    # equal weights: TRL's KL is 0; the old comparison (filtered policy vs unfiltered reference) was not
    ref = trl_logps(logits, ids, temperature)
    _, m = grpo_loss(filtered, filtered.detach(), adv, mask, kl_logps=unfiltered, ref_logps=ref,
                                   beta=0.04, **kw)
    assert m["kl"] == pytest.approx(0.0, abs=1e-7)
    _, old = grpo_loss(filtered, filtered.detach(), adv, mask, ref_logps=ref, beta=0.04, **kw)
    assert old["kl"] > 1e-3
    # a different reference: TRL's per-token k3, masked mean; the loss adds beta x TRL's KL aggregated by loss_type
    ref_logits = logits + 0.5 * torch.randn(logits.shape, generator=g)
    ref = trl_logps(ref_logits, ids, temperature)
    loss, m = grpo_loss(filtered, filtered.detach(), adv, mask, kl_logps=unfiltered, ref_logps=ref,
                                      beta=0.04, **kw)
    per_token_kl = trl_kl(trl_logps(logits, ids, temperature), ref)
    assert m["kl"] == pytest.approx(float(per_token_kl[mask].mean()), rel=1e-5)
    policy_only, pm = grpo_loss(filtered, filtered.detach(), adv, mask, **kw)
    kl_part = (per_token_kl * mask).sum(-1) / mask.sum(-1) if loss_type == "grpo" else None
    kl_agg = kl_part.mean() if loss_type == "grpo" else (per_token_kl * mask).sum() / mask.sum()
    assert float(loss) == pytest.approx(float(policy_only + 0.04 * kl_agg), rel=1e-5)
    assert m["ratio_mean"] == pm["ratio_mean"]  # the ratio is the filtered distribution's


def test_grpo_step_logs_zero_text_kl_before_any_update_with_top_k_and_top_p():
    tok = train_chat_tokenizer(["the red circle is left of the blue square.", "<think> look </think> no"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    ref = CausalLMPolicy(copy.deepcopy(model).eval().requires_grad_(False), tok)
    policy = CausalLMPolicy(model, tok)
    reward = CombinedReward([RewardSpec(name="reflection_format")])
    s = TextGRPOSettings(group=3, temperature=0.9, top_k=5, top_p=0.8, max_new_tokens=6, beta=0.04)
    torch.manual_seed(1)
    row = grpo_step(policy, torch.optim.SGD(model.parameters(), lr=0.0), ["the red circle"], reward, s, ref=ref)
    assert row["kl/text"] == pytest.approx(0.0, abs=1e-6)
