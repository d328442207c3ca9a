"""`rollout.credit: flow_grpo`: plain FlowGRPO on the generator alone, on a tiny SD3 checkpoint.

The run must never load a reflector or a refiner (their model paths here do not exist, and
loading a reflector fails the test), train the generator on every step and evaluate round 0.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r3rl.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
NOISY = REPO / "tests" / "fixtures" / "noisy_reward.py"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tokenizer) -> Path:
    from r3rl.models.tiny import build_tiny_sd3
    from r3rl.shapes.prompts import shapes_prompts, write_jsonl

    root = tmp_path_factory.mktemp("flow_grpo")
    build_tiny_sd3(tokenizer, 32).save_pretrained(root / "sd3")
    write_jsonl(shapes_prompts("train", 8), root / "train.jsonl")
    write_jsonl(shapes_prompts("eval", 2), root / "eval.jsonl")
    path = root / "recipe.yaml"
    path.write_text(f"""
output_dir: {root / 'run'}
world: {{image_size: 32}}
data: {{train_prompts: {root / 'train.jsonl'}, eval_prompts: {root / 'eval.jsonl'}, num_eval_prompts: 2}}
reflector: {{model: {root / 'no-reflector'}}}
refiner: {{model: {root / 'no-refiner'}}}
generator: {{model: {root / 'sd3'}, train: true, lora: {{r: 4, alpha: 8}}, lr: 1.0e-2, num_steps: 3, cfg_scale: 2.0}}
flow_grpo: {{timesteps: subset, num_train_timesteps: 2, beta: 0.04}}
rollout: {{credit: flow_grpo, group_size: 3}}
trainer: {{max_steps: 2, eval_every: 2, save_every: 2, log_images_every: 0}}
eval: {{rounds: 3, num_steps: 2, batch_size: 2}}
rewards: [{{name: "{NOISY}:noisy_reward"}}]
""")
    return path


def test_generator_only_run_builds_and_trains_the_generator_alone(recipe, tmp_path, monkeypatch):
    from r3rl.models.reflector import HFReflector
    from r3rl.evaluate import evaluate_run
    from r3rl.run import build_run
    from r3rl.trainer import train_step

    def no_reflector(*args, **kwargs):
        raise AssertionError("a generator-only run loaded a reflector")

    monkeypatch.setattr(HFReflector, "from_pretrained", no_reflector)
    run = build_run(load_config(recipe, [f"output_dir={tmp_path}"]))
    assert run.reflector is None and run.refiner is None and run.reflector_opt is None
    lora = {n: p.detach().clone() for n, p in run.generator.model.transformer.named_parameters() if p.requires_grad}
    rows = [train_step(run, step) for step in (1, 2)]
    assert [r["stage"] for r in rows] == ["generate", "generate"]
    for r in rows:
        assert r["frac_reward_zero_std"] == 0.0 and 0.0 <= r["reward/mean"] <= 1.0
        assert torch.isfinite(torch.tensor([r["loss/flow_grpo"], r["grad_norm"]])).all()
    assert rows[1]["kl/image"] > 0.0  # step 1 moved the LoRA away from the base (the KL reference)
    moved = [n for n, p in run.generator.model.transformer.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert moved and len(run.buffer) == 0  # no refine step will ever read the buffer
    result = evaluate_run(run)
    assert len(result.images) == 1 and "eval/round0_mean" in result.metrics  # eval.rounds=3 ignored: round 0 only
    assert not any(k.startswith("eval/round1") for k in result.metrics)
    assert result.metrics["eval/final_mean"] == result.metrics["eval/round0_mean"]


def test_generator_only_run_with_a_frozen_generator_is_one_clear_error(recipe):
    from r3rl.errors import UserError
    from r3rl.run import build_run

    with pytest.raises(UserError, match=r"rollout.credit=flow_grpo trains the generator alone: set generator.train=true"):
        build_run(load_config(recipe, ["generator.train=false"]))


def test_generator_only_cli_train_then_refine_round_zero(recipe, run_cli, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "r3rl.cli", "train", str(recipe), f"output_dir={out}"],
                          check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and [r["stage"] for r in rows[1:]] == ["generate"] * 2
    assert "eval/round0_mean" in rows[2] and not any(k.startswith("eval/round1") for k in rows[2])
    ckpt = out / "checkpoints" / "step-2"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["buffer", "generator"]

    prompts = Path(load_config(recipe).data.eval_prompts)
    bad = run_cli("refine", "--checkpoint", str(out), "--prompts", str(prompts), "--rounds", "1",
                  "--out", str(tmp_path / "r1"))
    assert bad.returncode == 2 and "generator only" in bad.stderr and "Traceback" not in bad.stderr
    ok = run_cli("refine", "--checkpoint", str(out), "--prompts", str(prompts), "--out", str(tmp_path / "r0"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    trace = [json.loads(line) for line in (tmp_path / "r0" / "trace.jsonl").read_text().splitlines()]
    assert len(trace) == 2 and all(len(t["rounds"]) == 1 for t in trace)


def test_flow_grpo_recipe_settings_batch_std_and_t5_length(recipe, tmp_path, monkeypatch):
    """flow_grpo's global_std (`scale_rewards: batch`) over a step of two groups, and its 128-token
    T5: the advantages of a step are its groups' deviations over the std of all their rewards."""
    from r3rl import trainer
    from r3rl.run import build_run

    cfg = load_config(recipe, [f"output_dir={tmp_path}", "rollout.scale_rewards=batch", "trainer.grad_accum=2",
                               "generator.max_text_len=12"])
    run = build_run(cfg)
    assert run.generator.model.max_text_len == 12
    # the two batches the step trains on, as the loss sees them
    seen = []
    loss = trainer.batch_loss
    monkeypatch.setattr(trainer, "batch_loss", lambda run, batch: (seen.append(batch), loss(run, batch))[1])
    row = trainer.train_step(run, 1)
    assert len(seen) == 2 and math.isfinite(row["loss/flow_grpo"])
    pools = [b.image_terms[0].pool for b in seen]
    spread = torch.cat(pools).std()
    for b, pool in zip(seen, pools):
        assert torch.allclose(b.image_terms[0].adv, (pool - pool.mean()) / (spread + 1e-4), atol=1e-6)


def test_scale_rewards_takes_the_old_switch_and_refuses_batch_with_tree_credit(recipe):
    from r3rl.errors import ConfigError, UserError
    from r3rl.run import build_run

    assert load_config(recipe, ["rollout.scale_rewards=true"]).rollout.scale_rewards == "group"
    assert load_config(recipe, ["rollout.scale_rewards=false"]).rollout.scale_rewards == "none"
    with pytest.raises(ConfigError, match="rollout.scale_rewards"):
        load_config(recipe, ["rollout.scale_rewards=global"])
    with pytest.raises(UserError, match="scale_rewards=batch is not defined for tree credit"):
        build_run(load_config(recipe, ["rollout.credit=tree", "rollout.scale_rewards=batch"]))


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_a_step_holds_one_rollout_at_a_time_unless_batch_scaling_needs_all(recipe, tmp_path, scale, monkeypatch):
    """Memory: each rollout is backpropagated before the next is made; `batch` scaling alone makes
    (and holds) all of the step's rollouts before the first loss."""
    from r3rl import trainer
    from r3rl.run import build_run

    run = build_run(load_config(recipe, [f"output_dir={tmp_path}", f"rollout.scale_rewards={scale}",
                                         "trainer.grad_accum=3"]))
    made, seen = [], []
    rollout, loss = trainer._generate_rollout, trainer.batch_loss
    monkeypatch.setattr(trainer, "_generate_rollout", lambda *a, **kw: (made.append(1), rollout(*a, **kw))[1])
    monkeypatch.setattr(trainer, "batch_loss", lambda run, batch: (seen.append(len(made)), loss(run, batch))[1])
    trainer.train_step(run, 1)
    assert seen == ([1, 2, 3] if scale == "group" else [3, 3, 3])
