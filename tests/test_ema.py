"""`trainer.ema`: the EMA arithmetic against values worked out by hand (`r3rl.algos.ema`),
evaluation on the averages with the live weights back bit for bit after, exact resume with the
averages in the checkpoint, and the one-line refusals (ZeRO-3, text credit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r3rl.algos.ema import EMA, decay_at
from r3rl.config import Config, load_config
from r3rl.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
NOISY = REPO / "tests" / "fixtures" / "noisy_reward.py"


# --------------------------------------------------------------------------- the arithmetic


def test_decay_warms_up_to_the_configured_decay() -> None:
    assert decay_at(0.9, 1) == pytest.approx(2 / 11)
    assert decay_at(0.9, 70) == pytest.approx(71 / 80)  # still below 0.9
    assert decay_at(0.9, 100) == 0.9 and decay_at(0.5, 9) == 0.5  # 101/110 and 10/19 are past it


def test_update_blends_on_every_nth_step_by_hand() -> None:
    ema = EMA([torch.tensor([1.0, -2.0])], decay=0.9, every=2)
    live = torch.tensor([3.0, 2.0])
    ema.update([live])  # step 1: no blend
    assert ema.shadow[0].tolist() == [1.0, -2.0]
    ema.update([live])  # step 2: d = min(0.9, 3/12) = 0.25; 1 + 0.75 * 2 = 2.5, -2 + 0.75 * 4 = 1
    assert ema.shadow[0].tolist() == [2.5, 1.0]
    live = torch.tensor([5.0, 0.0])
    ema.update([live])
    ema.update([live])  # step 4: d = 5/14; 2.5 + 9/14 * 2.5 = 4.1071428, 1 - 9/14 = 0.3571428
    torch.testing.assert_close(ema.shadow[0], torch.tensor([4.1071428, 0.3571428]))
    ema.load_state_dict({"steps": 99, "shadow": [torch.tensor([0.0, 4.0])]}, "test")
    ema.update([torch.tensor([1.0, 1.0])])  # step 100: past the warm-up, d = 0.9
    torch.testing.assert_close(ema.shadow[0], torch.tensor([0.1, 3.7]))
    assert ema.steps == 100


def test_applied_swaps_the_average_in_and_the_live_bits_back() -> None:
    p = torch.nn.Parameter(torch.tensor([0.1, 0.2, 0.3], dtype=torch.bfloat16))
    ema = EMA([p], decay=0.5, every=1)
    with torch.no_grad():
        p.add_(1.0)
    ema.update([p])  # d = 2/11: shadow = 0.1 + 9/11 * 1.0 ..., kept in float32
    assert ema.shadow[0].dtype == torch.float32
    live = p.detach().clone()
    with ema.applied([p]):
        assert torch.equal(p, ema.shadow[0].to(torch.bfloat16)) and not torch.equal(p, live)
    assert torch.equal(p, live)
    with pytest.raises(RuntimeError, match="boom"), ema.applied([p]):  # an evaluation that fails
        raise RuntimeError("boom")
    assert torch.equal(p, live)


def test_saved_state_round_trips_and_other_weights_are_refused() -> None:
    a = EMA([torch.ones(2), torch.zeros(3)], decay=0.9, every=1)
    a.update([torch.full((2,), 3.0), torch.ones(3)])
    b = EMA([torch.zeros(2), torch.zeros(3)], decay=0.9, every=1)
    b.load_state_dict(a.state_dict(), "ckpt")
    assert b.steps == 1 and all(torch.equal(x, y) for x, y in zip(a.shadow, b.shadow))
    with pytest.raises(UserError, match="ckpt: the saved EMA has 2 tensors that do not match the 1 trained"):
        EMA([torch.zeros(4)], decay=0.9, every=1).load_state_dict(a.state_dict(), "ckpt")


# --------------------------------------------------------------------------- in a run


def _config(tiny_world: list[str], out: Path, *extra: str) -> Config:
    """A tiny R3 run training all three policies, averaged after every step (decay 0.5); the noisy
    reward gives every group non-zero advantages, so each optimiser step moves the weights."""
    return load_config(REPO / "recipes" / "shapes_cpu.yaml", [
        *tiny_world, f"output_dir={out}", "device=cpu", "rollout.group_size=2", "trainer.ema={decay: 0.5, every: 1}",
        "eval.rounds=1", "eval.num_steps=2", "eval.samples_per_prompt=1", "eval.batch_size=2",
        "data.num_eval_prompts=2", "reflector.lr=1e-2", "generator.lr=1e-2", "refiner.lr=1e-2",
        f"rewards=[{{name: '{NOISY}:noisy_reward'}}]", *extra])


def test_eval_uses_the_averages_and_restores_the_live_weights_bit_for_bit(tiny_world, tmp_path, monkeypatch) -> None:
    from r3rl import evaluate
    from r3rl.evaluate import evaluate_run
    from r3rl.run import build_run
    from r3rl.trainer import train_step

    run = build_run(_config(tiny_world, tmp_path / "run"))
    assert sorted(run.ema) == ["generator", "refiner", "reflector"]
    start = [p.detach().clone() for p in run.trained_params("generator")]
    train_step(run, 1)  # a generate step: the generator's first optimiser step
    after = [p.detach().clone() for p in run.trained_params("generator")]
    assert not all(torch.equal(a, b) for a, b in zip(start, after))
    for s, a, b in zip(run.ema["generator"].shadow, start, after):  # d = min(0.5, 2/11)
        torch.testing.assert_close(s, a + 9 / 11 * (b - a))
    train_step(run, 2)  # a refine step: the reflector's
    assert {name: ema.steps for name, ema in run.ema.items()} == {"reflector": 1, "generator": 1, "refiner": 0}
    with torch.no_grad():  # every live weight away from its average, also those no step has moved
        for name in run.ema:
            for p in run.trained_params(name):
                p.add_(0.01)
    live = {name: [p.detach().clone() for p in run.trained_params(name)] for name in run.ema}
    seen = {}
    evaluate_rounds = evaluate.evaluate_rounds

    def spy(*args, **kwargs):
        seen.update({name: [p.detach().clone() for p in run.trained_params(name)] for name in run.ema})
        return evaluate_rounds(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_rounds", spy)
    assert "eval/final_mean" in evaluate_run(run).metrics
    for name, ema in run.ema.items():
        assert all(torch.equal(s, a.to(s.dtype)) for s, a in zip(seen[name], ema.shadow, strict=True)), name
        assert not any(torch.equal(s, v) for s, v in zip(seen[name], live[name])), name
        assert all(torch.equal(p, v) for p, v in zip(run.trained_params(name), live[name], strict=True)), name


def test_resume_with_ema_matches_the_uninterrupted_run(tiny_world, tmp_path) -> None:
    """Steps 3-4 after 2 steps + resume equal an uninterrupted run's, evaluations of the averages
    included, and so do the averages saved at step 4 (float32 state and user-facing weights)."""
    from r3rl.trainer import train

    def run(out: Path, *extra: str) -> list[dict]:
        train(_config(tiny_world, out, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.save_every=2",
                      "trainer.log_images_every=0", *extra))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    full = run(tmp_path / "full")
    run(tmp_path / "cut", "trainer.max_steps=2")
    cut = run(tmp_path / "cut", "resume=auto")
    assert [r["step"] for r in cut] == [0, 1, 2, 3, 4] and "eval/final_mean" in cut[4]
    assert cut == full
    a, b = (tmp_path / d / "checkpoints" / "step-4" / "ema" for d in ("full", "cut"))
    sa, sb = (torch.load(d / "state.pt", weights_only=True) for d in (a, b))
    assert sorted(sa) == ["generator", "refiner", "reflector"] and sa["generator"]["steps"] == 2
    for name in sa:
        assert sa[name]["steps"] == sb[name]["steps"]
        assert all(torch.equal(x, y) for x, y in zip(sa[name]["shadow"], sb[name]["shadow"], strict=True)), name
    users = {d: load_file(d / "generator" / "transformer" / "diffusion_pytorch_model.safetensors") for d in (a, b)}
    assert users[a].keys() == users[b].keys() and all(torch.equal(users[a][k], users[b][k]) for k in users[a])
    live = load_file(a.parent / "generator" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(live[k], users[a][k]) for k in live)  # the average, not the live weights
    assert (a / "reflector").is_dir() and (a / "refiner" / "transformer").is_dir()


def test_refine_ema_loads_the_averages_of_the_trained_policies(tiny_world, tmp_path) -> None:
    """`r3rl refine --ema` (`load_trained(ema=True)`) runs the averaged weights the run's eval scored;
    without it the live ones; a run without `trainer.ema` has none to load (one line)."""
    from r3rl.inference import load_trained
    from r3rl.trainer import train

    train(_config(tiny_world, tmp_path / "run", "trainer.max_steps=2", "trainer.eval_every=0",
                  "trainer.log_images_every=0"))
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"
    files = [d / "generator" / "transformer" / "diffusion_pytorch_model.safetensors" for d in (ckpt / "ema", ckpt)]
    average, live = (load_file(f) for f in files)
    assert any(not torch.equal(average[k], live[k]) for k in live)  # so the two loads can be told apart
    for ema, folder in ((True, ckpt / "ema"), (False, ckpt)):
        run, _ = load_trained(tmp_path / "run", ema=ema)
        saved = load_file(folder / "generator" / "transformer" / "diffusion_pytorch_model.safetensors")
        state = run.generator.model.transformer.state_dict()
        assert all(torch.equal(state[k], saved[k]) for k in saved), ema
    train(_config(tiny_world, tmp_path / "plain", "trainer.max_steps=1", "trainer.eval_every=0", "trainer.ema=null"))
    with pytest.raises(UserError, match="holds no averaged weights") as err:
        load_trained(tmp_path / "plain", ema=True)
    assert "\n" not in str(err.value)


def test_ema_under_zero3_is_refused_before_any_model_loads(tiny_world, tmp_path, monkeypatch) -> None:
    from r3rl import run

    monkeypatch.setattr(run, "_shapes_world", lambda *args: pytest.fail("a model was loaded"))
    cfg = _config(tiny_world, tmp_path / "run", f"distributed.deepspeed={REPO / 'launch/deepspeed/zero3.json'}")
    with pytest.raises(UserError) as err:
        run.build_run(cfg)
    assert str(err.value).startswith("trainer.ema is not supported under ZeRO-3") and "\n" not in str(err.value)


def test_ema_with_text_credit_is_refused(tmp_path) -> None:
    from r3rl.text_grpo import train_text

    (tmp_path / "p.jsonl").write_text('{"prompt": "the red circle"}\n')
    cfg = load_config(REPO / "recipes" / "grpo_text.yaml", [
        f"data.train_prompts={tmp_path / 'p.jsonl'}", f"output_dir={tmp_path / 'run'}", "trainer.ema={}"])
    with pytest.raises(UserError, match=r"trainer.ema is not supported with rollout.credit=text"):
        train_text(cfg)


def test_resuming_with_ema_from_a_checkpoint_without_one_is_one_line(tiny_world, tmp_path) -> None:
    from r3rl.trainer import train

    out = tmp_path / "run"
    train(_config(tiny_world, out, "trainer.max_steps=1", "trainer.eval_every=0", "trainer.ema=null"))
    with pytest.raises(UserError, match=r"holds no EMA of the \w+ \(saved without trainer.ema\)") as err:
        train(_config(tiny_world, out, "trainer.max_steps=2", "trainer.eval_every=0", "resume=auto"))
    assert "\n" not in str(err.value) and "trainer.ema=null" in str(err.value)
