"""End-to-end: the real `r3rl train` CLI and the trainer API on a tiny shapes world."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_world_yaml
from PIL import Image

from r3rl.config import load_config

FIXTURES = Path(__file__).parent / "fixtures"
REQUIRED = {
    "step", "stage", "reward/mean", "loss/grpo", "loss/flow_grpo", "frac_reward_zero_std", "refine/stop_rate",
    "judge/failures", "time/step_s", "time/rollout_s", "time/train_s", "reward/format_mean",
    "reward/improvement_mean",
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """A recipe whose world pretrains in seconds (shared cache across this module's tests)."""
    root = tmp_path_factory.mktemp("e2e")
    path = root / "tiny.yaml"
    path.write_text(f"""
{tiny_world_yaml(root)}
generator: {{train: true, num_steps: 3, lr: 1.0e-3}}
refiner: {{num_steps: 3, lr: 1.0e-3}}
rollout: {{group_size: 3, max_rounds: 2}}
trainer: {{max_steps: 4, eval_every: 2, save_every: 2}}
eval: {{rounds: 2, num_steps: 3, batch_size: 4}}
data: {{num_eval_prompts: 4}}
rewards: [{{name: "{FIXTURES / 'noisy_reward.py'}:noisy_reward"}}]
""")
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_cli_writes_metrics_checkpoints_and_config(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "r3rl.cli", "train", str(recipe), f"output_dir={out}"],
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert "eval/round0_mean" in rows[0] and "eval/final_mean" in rows[0]
    assert {r["stage"] for r in rows[1:]} == {"generate", "refine"}
    keys = set().union(*rows[1:])
    assert REQUIRED <= keys, REQUIRED - keys
    for k in range(3):
        assert f"eval/round{k}_mean" in rows[2] and f"eval/round{k}_mean" in rows[4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (out / "checkpoints" / "step-4" / "COMPLETE").exists()
    assert (out / "config.yaml").exists() and list((out / "tensorboard").iterdir())
    # the gold judge (eval-only) sits beside the trained reward at step 0 and every evaluation
    for row in (rows[0], rows[2], rows[4]):
        for k in range(3):
            assert 0.0 <= row[f"eval/gold/round{k}_acc"] <= 1.0
            assert 0.0 <= row[f"eval/gold/round{k}_clutter"] <= 1.0
        assert row["eval/gold/final_acc"] == row["eval/gold/round2_acc"]
        assert {"eval/verdict_acc", "eval/stop_precision", "eval/stop_recall", "eval/gold/verdict_acc"} <= set(row)
    # pictures as evidence: step 0 and the end, per round, and the two side by side
    for step in (0, 4):
        assert sorted(p.name for p in (out / "grids" / f"step-{step}").glob("round*.png")) == [
            "round0.png", "round1.png", "round2.png"]
    grid = Image.open(out / "grids" / "step0_vs_final.png")
    assert grid.width > grid.height / 4  # 6 columns: rounds 0-2 at step 0, then at step 4
    # the closing summary: gold and trained reward at step 0 and at the end, where things are
    for text in ("trained reward, final round", "gold acc, round 0", "gold acc, final round",
                 "step0_vs_final.png", "tensorboard --logdir", str(out / "checkpoints")):
        assert text in proc.stderr, text


@pytest.mark.parametrize("reflector,refiner", [(True, False), (False, True), (True, True)])
def test_which_policies_train_is_a_recipe_switch(recipe: Path, tmp_path: Path, reflector: bool, refiner: bool) -> None:
    from r3rl.run import build_run
    from r3rl.trainer import train_step

    cfg = load_config(recipe, [f"output_dir={tmp_path}", f"reflector.train={reflector}", f"refiner.train={refiner}",
                               "generator.train=false", "rollout.perfect_prob=0"])
    run = build_run(cfg)
    before_r = [p.detach().clone() for p in run.reflector.model.parameters()]
    before_f = [p.detach().clone() for p in run.refiner.model.transformer.parameters()]
    gen_before = [p.detach().clone() for p in run.generator.model.transformer.parameters()]
    # 60 SFT steps teach the tiny reflector the <think>..</think> format, so it writes edits
    for step in range(1, 4):
        train_step(run, step)
    changed = lambda before, module: any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert changed(before_r, run.reflector.model) == reflector
    assert changed(before_f, run.refiner.model.transformer) == refiner
    assert not changed(gen_before, run.generator.model.transformer)


def test_tree_credit_step_runs_and_logs(recipe: Path, tmp_path: Path) -> None:
    from r3rl.run import build_run
    from r3rl.trainer import train_step

    cfg = load_config(recipe, [f"output_dir={tmp_path}", "rollout.credit=tree", "rollout.group_size=2",
                               "rollout.tree_k=2", "rollout.tree_m=1"])
    run = build_run(cfg)
    m = train_step(run, 1)
    assert m["stage"] == "tree"
    assert 0.0 <= m["refine/stop_rate"] <= 1.0 and "loss/grpo" in m


def test_resume_auto_matches_uninterrupted_run(recipe: Path, tmp_path: Path) -> None:
    def train(out: Path, *extra: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "r3rl.cli", "train", str(recipe), f"output_dir={out}",
                               "trainer.eval_every=0", "trainer.save_every=1", *extra],
                              check=False, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]

    train(tmp_path / "full")
    train(tmp_path / "cut", "trainer.max_steps=2")
    train(tmp_path / "cut", "resume=auto")
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}
    assert [drop(r) for r in _rows(tmp_path / "cut")] == [drop(r) for r in _rows(tmp_path / "full")]


def test_gradient_accumulation_runs_k_rollouts_per_optimizer_step(recipe: Path, tmp_path: Path) -> None:
    from r3rl.run import build_run
    from r3rl.trainer import train_step

    cfg = load_config(recipe, [f"output_dir={tmp_path}", "trainer.grad_accum=2"])
    run = build_run(cfg)
    m = train_step(run, 1)  # step 1 is a generate step when the generator trains
    assert m["stage"] == "generate"
    assert len(run.buffer) == 2 * cfg.rollout.group_size  # two rollouts fed the buffer
    steps = {int(s["step"]) for s in run.generator.opt.state.values()}
    assert steps == {1}  # ... and the optimiser stepped once


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(recipe: Path, tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "r3rl.cli", "train", str(recipe), f"output_dir={out}",
                             "trainer.max_steps=500", "trainer.eval_every=0", "trainer.save_every=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and len(_rows(out)) >= 2):  # step 0 eval + step 1 done
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before the signal"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    step = _rows(out)[-1]["step"]
    assert step < 500 and (out / "checkpoints" / f"step-{step}" / "COMPLETE").exists()
    assert "resume=auto" in err


def test_max_minutes_stops_evaluates_and_saves_at_the_step_the_budget_runs_out(recipe: Path, tmp_path: Path) -> None:
    from r3rl.trainer import train

    # a budget far below one step's time: the first step exhausts it
    cfg = load_config(recipe, [f"output_dir={tmp_path}", "trainer.max_steps=50", "trainer.max_minutes=0.0001",
                               "trainer.eval_every=20"])
    train(cfg)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    assert "eval/final_mean" in rows[1] and "eval/gold/final_acc" in rows[1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]
    assert (tmp_path / "grids" / "step0_vs_final.png").exists()


@pytest.mark.parametrize("credit", ["r3", "tree"])
def test_trl_text_rewards_shape_the_reflector_in_r3_and_tree_credit(recipe: Path, tmp_path: Path, credit: str) -> None:
    """A TRL-style reward on completion_ids, weighted heavily: the reflector's advantages follow the
    reflections' lengths (they would not with image rewards alone, which ignore the text)."""
    from r3rl.run import build_run
    from r3rl.trainer import _refine_rollout, _tree_rollout

    (tmp_path / "length.py").write_text(
        "def length(prompts, completions, completion_ids, **kwargs):\n"
        "    return [float(len(ids)) for ids in completion_ids]\n"
    )
    rewards = f"rewards=[{{name: '{FIXTURES / 'noisy_reward.py'}:noisy_reward'}}, " \
              f"{{name: '{tmp_path / 'length.py'}:length', weight: 1000.0}}]"
    cfg = load_config(recipe, [f"output_dir={tmp_path}", f"rollout.credit={credit}", "rollout.group_size=4",
                               "rollout.tree_k=4", "rollout.tree_m=1", "rollout.max_rounds=1",
                               "rollout.scale_rewards=none", "reflector.max_new_tokens=32", rewards])
    run = build_run(cfg)
    gen = torch.Generator().manual_seed(0)
    if credit == "r3":
        from r3rl.trainer import _generate_rollout

        _generate_rollout(run, gen, train=False)  # feeds the buffer
        batch = _refine_rollout(run, gen, 1)
    else:
        batch = _tree_rollout(run, gen, 1)
    (term,) = batch.text_terms
    lengths = torch.tensor([float(len(r.token_ids)) for r in term.reflections])
    assert lengths.std() > 0, "the test needs reflections of different lengths"
    # the length reward (x1000) dominates: advantages rank the reflections as their lengths do
    longest, shortest = int(lengths.argmax()), int(lengths.argmin())
    assert float(term.adv[longest]) > float(term.adv[shortest]) + 500
