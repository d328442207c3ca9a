"""Plain text GRPO (`rollout.credit: text`): shared-prefix forward == plain forward, on-policy
ratios of exactly 1, and the real `r3rl train` CLI on a tiny Qwen2 causal LM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from r3rl.models.tokenizer import train_chat_tokenizer
from r3rl.text_grpo import CausalLMPolicy, TextGRPOSettings

CORPUS = [f"the {c} {s} is left of the {c2} square." for c in ("red", "blue", "green") for s in ("circle", "star")
          for c2 in ("yellow", "purple")] + ["<think> look </think> no further edit needed"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    tok = train_chat_tokenizer(CORPUS)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    path = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _settings(**kw) -> TextGRPOSettings:
    return TextGRPOSettings(**{"group": 3, "temperature": 0.9, "top_k": 20, "max_new_tokens": 8, **kw})


def test_shared_prefix_matches_plain_forward(tiny_lm):
    """Different prompt lengths (left padding): same logits and same gradients either way."""
    policy = CausalLMPolicy.from_pretrained(tiny_lm)
    s = _settings()
    torch.manual_seed(1)
    c = policy.sample(["the red circle", "is the blue star left of the yellow square?"], s)
    assert (~c.prompt_mask.bool()).any(), "the test needs left padding"
    grads = []
    for shared in (True, False):
        policy.model.zero_grad()
        logits = policy.completion_logits(c, s.group, shared_prefix=shared)
        logits[c.completion_mask].logsumexp(-1).sum().backward()
        grads.append((logits.detach(), [p.grad.clone() for p in policy.model.parameters()]))
    (l1, g1), (l2, g2) = grads
    m = c.completion_mask
    torch.testing.assert_close(l1[m], l2[m], atol=1e-5, rtol=1e-4)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_behaviour_logprobs_are_of_the_sampled_distribution(tiny_lm):
    """Recomputed log-probs under the same temperature/top-k equal generate's: ratio 1 on-policy."""
    policy = CausalLMPolicy.from_pretrained(tiny_lm)
    policy.model.eval()
    s = _settings(top_k=5)
    torch.manual_seed(2)
    c = policy.sample(["the green star", "the red circle"], s)
    with torch.no_grad():
        logps, _ = policy.logprobs(c, s)
    m = c.completion_mask
    assert m.sum() > 4
    torch.testing.assert_close(logps[m], c.old_logps[m], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("offload", ["false", "true"])  # true: the KL reference runs from host memory
def test_cli_trains_a_text_policy(tiny_lm, tmp_path, offload):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("the red circle", "the blue star")))
    reward = tmp_path / "count_e.py"
    # a chat policy's completions reach rewards as TRL passes them: [{"role": "assistant", "content": ...}]
    reward.write_text("def count_e(prompts, completions, **kw):\n    return [c[0]['content'].count('e') for c in completions]\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "r3rl.cli", "train", "recipes/grpo_text.yaml", f"reflector.model={tiny_lm}",
           f"data.train_prompts={prompts}", f"output_dir={out}", "trainer.max_steps=3", "trainer.save_every=2",
           "reflector.lr=1e-3", "reflector.max_new_tokens=8", "rollout.group_size=4", "rollout.prompts_per_step=2",
           "reflector.beta=0.01", f"reflector.offload={offload}", f"rewards=[{{name: '{reward}:count_e'}}]"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward/mean", "loss/grpo", "kl/text", "clip_ratio", "entropy", "frac_reward_zero_std"):
        assert all(key in r for r in rows), key
    assert rows[0]["kl/text"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    assert rows[2]["kl/text"] > 0  # ... and drifts after updates
    ckpt = out / "checkpoints" / "step-3"
    assert (ckpt / "COMPLETE").exists() and (out / "checkpoints" / "step-2" / "COMPLETE").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert not torch.equal(reloaded.model.embed_tokens.weight,
                           AutoModelForCausalLM.from_pretrained(tiny_lm).model.embed_tokens.weight)


def test_resume_is_refused_with_one_line(tiny_lm, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "the red circle"}\n')
    cmd = [sys.executable, "-m", "r3rl.cli", "train", "recipes/grpo_text.yaml", f"reflector.model={tiny_lm}",
           f"data.train_prompts={tmp_path / 'p.jsonl'}", "resume=auto"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "resume is not supported with rollout.credit=text" in res.stderr


def test_missing_policy_folder_is_one_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "the red circle"}\n')
    cmd = [sys.executable, "-m", "r3rl.cli", "train", "recipes/grpo_text.yaml", f"reflector.model={tmp_path / 'nope'}",
           f"data.train_prompts={tmp_path / 'p.jsonl'}", f"output_dir={tmp_path / 'run'}"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"r3rl: error: reflector.model must be a local causal-LM directory with rollout.credit=text; "
        f"got '{tmp_path / 'nope'}'"]


def test_dropout_is_zeroed_in_rl_policies_so_the_first_ratio_is_one(tiny_lm, tmp_path):
    """A checkpoint with attention dropout 0.5: loaded as an RL policy its dropout is zeroed (TRL's
    disable_dropout), so in train mode (the update's, where gradient checkpointing works) its
    log-probs are those it sampled with."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, attention_dropout=0.5)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(tmp_path)
    s = _settings()
    raw = CausalLMPolicy(AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path))
    for policy, same in ((raw, False), (CausalLMPolicy.from_pretrained(tmp_path), True)):
        policy.model.eval()
        torch.manual_seed(3)
        c = policy.sample(["the green star", "the red circle"], s)
        m = c.completion_mask
        policy.model.train()
        with torch.no_grad():
            logps, _ = policy.logprobs(c, s)
        assert torch.allclose(logps[m], c.old_logps[m], atol=1e-4) is same
