"""Each policy's `adam_betas` / `adam_eps` / `weight_decay` reach its optimiser: torch's AdamW for
the reflector, generator and refiner, text GRPO's, and each policy's DeepSpeed ZeRO-2 engine's
(built from the config `deepspeed_config` fills)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from r3rl.config import adamw_kwargs, load_config, parse_config

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
ZERO2 = REPO / "launch" / "deepspeed" / "zero2.json"
# (betas, eps, weight decay) per policy, all different from each other and from the defaults
SETTINGS = {"reflector": ((0.8, 0.9), 1e-6, 0.01), "generator": ((0.85, 0.99), 1e-7, 0.02),
            "refiner": ((0.7, 0.98), 1e-5, 0.03)}
OVERRIDES = [item for name, ((b1, b2), eps, wd) in SETTINGS.items()
             for item in (f"{name}.adam_betas=[{b1}, {b2}]", f"{name}.adam_eps={eps}", f"{name}.weight_decay={wd}")]


def _adamw(group: dict) -> tuple:
    return tuple(group["betas"]), group["eps"], group["weight_decay"]


def test_defaults_are_the_adamw_every_run_used_before() -> None:
    cfg = parse_config({"output_dir": "x"})
    for section in (cfg.reflector, cfg.generator, cfg.refiner):
        assert _adamw(adamw_kwargs(section)) == ((0.9, 0.95), 1e-8, 0.0)


def test_recipe_adamw_reaches_each_torch_optimiser(tiny_world, tmp_path) -> None:
    from r3rl.run import build_run

    cfg = load_config(REPO / "recipes" / "shapes_cpu.yaml", [*tiny_world, f"output_dir={tmp_path / 'run'}",
                                                             "device=cpu", *OVERRIDES])
    run = build_run(cfg)
    for name, opt in (("reflector", run.reflector_opt), ("generator", run.generator.opt),
                      ("refiner", run.refiner.opt)):
        assert [_adamw(g) for g in opt.param_groups] == [SETTINGS[name]], name
        assert opt.param_groups[0]["lr"] == getattr(cfg, name).lr


def test_deepspeed_zero2_engines_take_the_recipe_adamw_and_feed_the_ema(tiny_world, tmp_path, monkeypatch) -> None:
    """One process, real ZeRO-2 engines: each policy's DeepSpeed optimiser has its recipe AdamW, and
    the EMA sees the engine's step (inside `backward`/`step`) and evaluation puts its weights back.
    The suite's only in-process DeepSpeed test: DeepSpeed keeps its groups across process groups."""
    pytest.importorskip("deepspeed")
    from conftest import free_port

    from r3rl.evaluate import evaluate_run
    from r3rl.run import build_run
    from r3rl.trainer import train_step

    for var, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "r3rl" / "torch_extensions"))):
        monkeypatch.setenv(var, value)
    cfg = load_config(REPO / "recipes" / "shapes_cpu.yaml", [
        *tiny_world, f"output_dir={tmp_path / 'run'}", "device=cpu", f"distributed.deepspeed={ZERO2}",
        "rollout.group_size=2", "trainer.ema={decay: 0.5, every: 1}", "eval.rounds=1", "eval.num_steps=2",
        "eval.samples_per_prompt=1", "eval.batch_size=2", "data.num_eval_prompts=2", "generator.lr=1e-2",
        f"rewards=[{{name: '{REPO / 'tests/fixtures/noisy_reward.py'}:noisy_reward'}}]", *OVERRIDES])
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        run = build_run(cfg)
        for name, engine in run.engines.items():
            assert [_adamw(g) for g in engine.optimizer.param_groups] == [SETTINGS[name]], name
            assert engine.optimizer.param_groups[0]["lr"] == getattr(cfg, name).lr
        assert sorted(run.engines) == sorted(run.ema) == ["generator", "refiner", "reflector"]
        start = [p.detach().clone() for p in run.trained_params("generator")]
        train_step(run, 1)  # a generate step
        after = [p.detach().clone() for p in run.trained_params("generator")]
        assert run.ema["generator"].steps == 1 and not all(torch.equal(a, b) for a, b in zip(start, after))
        for s, a, b in zip(run.ema["generator"].shadow, start, after):  # d = min(0.5, 2/11)
            torch.testing.assert_close(s, a + 9 / 11 * (b - a))
        evaluate_run(run)
        assert all(torch.equal(p, b) for p, b in zip(run.trained_params("generator"), after, strict=True))
    finally:
        torch.distributed.destroy_process_group()


def test_text_grpo_optimiser_takes_the_recipe_adamw(tmp_path, monkeypatch) -> None:
    from r3rl import text_grpo

    class Built(Exception):
        """Stops the run once its optimiser is built."""

    seen = {}

    def adamw(params, **kwargs):
        seen.update(kwargs)
        raise Built

    tiny = classmethod(lambda cls, *args, **kwargs: cls(torch.nn.Linear(2, 2), SimpleNamespace(pad_token_id=0)))
    monkeypatch.setattr(text_grpo.CausalLMPolicy, "from_pretrained", tiny)
    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    (tmp_path / "lm").mkdir()
    (tmp_path / "p.jsonl").write_text('{"prompt": "the red circle"}\n')
    cfg = load_config(REPO / "recipes" / "grpo_text.yaml", [
        f"reflector.model={tmp_path / 'lm'}", f"data.train_prompts={tmp_path / 'p.jsonl'}",
        f"output_dir={tmp_path / 'run'}", "reflector.adam_betas=[0.8, 0.9]", "reflector.adam_eps=1e-6",
        "reflector.weight_decay=0.05"])
    with pytest.raises(Built):
        text_grpo.train_text(cfg)
    assert seen == {"lr": cfg.reflector.lr, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.05}
