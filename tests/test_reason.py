"""R3's Reason stage (`rollout.reason`, issue 19): shapes plans, the planning turn of the
reflector, the plans' GRPO term, and training runs with it (CLI end to end, tree credit, a frozen
generator, resume, two processes)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_world_yaml
from test_distributed import _train
from test_recipes import tiny  # noqa: F401 (fixture)

from r3rl.batch import plan_term
from r3rl.config import load_config
from r3rl.distributed import Shard, Topology
from r3rl.errors import UserError
from r3rl.models.reflector import Reflection, sft_loss
from r3rl.reason import R3_PLAN_PROMPT, Plans, plan_format_ok, plan_of_text, reasoner
from r3rl.shapes.plan import SHAPES_PLAN_PROMPT, parse_plan, plan_of, plan_satisfies
from r3rl.shapes.prompts import split_prompts
from r3rl.shapes.scene import sample_scene

FIXTURES = Path(__file__).parent / "fixtures"


# ------------------------------------------------------------------ plans in the shapes world


def test_the_plan_of_every_sampled_scene_parses_back_and_meets_its_prompt() -> None:
    train, _ = split_prompts()
    rng = random.Random(0)
    for meta in train:
        plan = plan_of(sample_scene(meta, rng))
        assert parse_plan(plan) is not None and plan_satisfies(plan, meta), (meta["prompt"], plan)


def test_plan_checker_rejects_wrong_plans_and_non_plans() -> None:
    meta = {"tag": "position", "prompt": "a photo of a circle left of a square",
            "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    assert plan_satisfies("red circle top left , blue square top right", meta)
    assert not plan_satisfies("red circle top right , blue square top left", meta)  # wrong side
    assert not plan_satisfies("red circle top left", meta)  # the square is missing
    assert parse_plan("red circle top left , blue square top left") is None  # one cell, two objects
    assert parse_plan("red circle somewhere") is None and parse_plan("") is None
    assert not plan_satisfies("the red circle is left", meta)


def test_a_planning_turn_is_read_as_r3_writes_it() -> None:
    assert plan_of_text("<think>red circle top left</think>") == "red circle top left"
    assert plan_format_ok("<think>red circle top left</think>")
    assert plan_of_text("<think>red circle top left") == "red circle top left"  # unclosed: the text
    for bad in ("<think>red circle top left", "red circle", "<think></think>", "<think>a</think> b",
                "<think>a</think><think>b</think>"):
        assert not plan_format_ok(bad), bad


# ------------------------------------------------------------------ the reflector's planning turn


@pytest.fixture(scope="module")
def reflector():
    from r3rl.shapes.critique import corpus
    from r3rl.shapes.tiny_reflector import build_tiny_reflector

    return build_tiny_reflector(corpus(), 32, seed=0)


def test_text_only_turns_sample_with_behaviour_logprobs_that_rescoring_reproduces(reflector) -> None:
    turns = [SHAPES_PLAN_PROMPT.format(prompt="a photo of a red circle")] * 3
    kw = {"temperature": 0.9, "top_k": 50, "top_p": 1.0}
    plans = reflector.reflect(turns, None, max_new_tokens=8, seed=3, **kw)
    assert len(plans) == 3 and all(p.token_ids for p in plans)
    logps, mask, _ = reflector.completion_logprobs(turns, None, [p.token_ids for p in plans], with_grad=False, **kw)
    for i, p in enumerate(plans):  # the PPO ratio of a fresh plan starts at exactly 1
        assert torch.allclose(logps[i][mask[i]], torch.tensor(p.logprobs), atol=1e-4)


def test_sft_teaches_the_text_only_planning_turn(reflector) -> None:
    import copy

    from r3rl.shapes.tiny_reflector import sft_reflector

    student = copy.deepcopy(reflector)
    turns = [SHAPES_PLAN_PROMPT.format(prompt="a photo of a red circle")] * 4
    targets = ["<think>red circle top left</think>"] * 4
    before = sft_loss(student, turns, None, targets).item()
    sft_reflector(student, [], steps=20, batch_size=4, plan_examples=list(zip(turns, targets)), plan_every=1)
    assert sft_loss(student, turns, None, targets).item() < before / 4


# ------------------------------------------------------------------ the plans' GRPO term


def _plans(texts: list[str]) -> Plans:
    refl = [Reflection(t, [1, 2], [-0.1, -0.2], plan_of_text(t), plan_format_ok(t)) for t in texts]
    return Plans([f"turn {i}" for i in range(len(texts))], refl, texts)


def test_plan_rewards_are_r3s_generate_text_rewards_relative_to_the_group() -> None:
    plans = _plans(["<think>a</think>", "<think>b</think>", "no tags", "<think>c</think>"])
    image = torch.tensor([1.0, 0.0, 1.0, float("nan")])
    term = plan_term(plans, image, Shard(4, Topology()), format_weight=1.0, scale_std=False)
    # text reward f·(r + 1): 2, 1, 0 (bad format, whatever its image), NaN (unscored: masked)
    assert term.valid.tolist() == [True, True, True, False]
    assert torch.allclose(term.adv[:3], torch.tensor([1.0, 0.0, -1.0]))
    assert term.images is None and term.prompts == ["turn 0", "turn 1", "turn 2", "turn 3"]
    assert term.tokens == 6  # the valid plans' tokens, for dapo


def test_each_rank_trains_its_rows_of_the_group_with_the_whole_groups_advantages() -> None:
    plans = _plans([f"<think>{c}</think>" for c in "abcd"])
    image = torch.tensor([0.0, 1.0, 2.0, 3.0])
    whole = plan_term(plans, image, Shard(4, Topology()), format_weight=1.0, scale_std=True)
    parts = [plan_term(plans, image, Shard(4, Topology(r, 2)), format_weight=1.0, scale_std=True) for r in range(2)]
    assert torch.equal(torch.cat([p.adv for p in parts]), whole.adv)
    assert [p.prompts for p in parts] == [["turn 0", "turn 1"], ["turn 2", "turn 3"]]


def test_reasoner_defaults_r3s_prompt_for_real_models_and_the_worlds_for_shapes(tmp_path: Path) -> None:
    shapes = load_config(FIXTURES / "minimal.yaml", [f"output_dir={tmp_path}", "rollout.reason=true"])
    r = reasoner(shapes)
    assert r.prompt == SHAPES_PLAN_PROMPT and r.checker is plan_satisfies and r.template == "{prompt}. {plan}"
    real = shapes.model_copy(update={"reflector": shapes.reflector.model_copy(update={"model": str(tmp_path)})})
    assert reasoner(real).prompt == R3_PLAN_PROMPT and reasoner(real).checker is None
    assert "<think> planning process here </think>" in R3_PLAN_PROMPT
    assert reasoner(load_config(FIXTURES / "minimal.yaml", [f"output_dir={tmp_path}"])) is None


def test_reason_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="reason_template"):
        load_config(FIXTURES / "minimal.yaml", [f"output_dir={tmp_path}", "rollout.reason_template={prompt}"])
    from r3rl.run import build_run

    cfg = load_config(FIXTURES / "minimal.yaml", [f"output_dir={tmp_path}", "rollout.reason=true",
                                                  "rollout.credit=flow_grpo", "generator.train=true"])
    with pytest.raises(UserError, match="rollout.reason=true needs rollout.credit r3 or tree"):
        build_run(cfg)


# ------------------------------------------------------------------ training with a plan


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reason")
    path = root / "tiny.yaml"
    path.write_text(f"""
{tiny_world_yaml(root)}
generator: {{train: true, num_steps: 3, lr: 1.0e-3}}
refiner: {{num_steps: 3, lr: 1.0e-3}}
rollout: {{group_size: 3, max_rounds: 2, reason: true, reason_max_new_tokens: 12}}
trainer: {{max_steps: 4, eval_every: 2, save_every: 2}}
eval: {{rounds: 2, num_steps: 3, batch_size: 4}}
data: {{num_eval_prompts: 4}}
rewards: [{{name: "{FIXTURES / 'noisy_reward.py'}:noisy_reward"}}]
""")
    return path


def _cli(recipe: Path, out: Path, *extra: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "r3rl.cli", "train", str(recipe), f"output_dir={out}", *extra],
                          check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
def test_train_cli_with_reason_trains_and_logs_the_plans(recipe: Path, tmp_path: Path) -> None:
    rows = _cli(recipe, tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    generate = [r for r in rows[1:] if r["stage"] == "generate"]
    refine = [r for r in rows[1:] if r["stage"] == "refine"]
    assert generate and refine
    for r in generate:  # the plans' GRPO loss, their length and the checker's verdict on them
        assert math.isfinite(r["loss/grpo_reason"]) and r["reason/plan_length"] > 0
        assert 0.0 <= r["reason/plan_satisfied"] <= 1.0 and 0.0 <= r["reason/format_mean"] <= 1.0
        assert "reason/completion_length" in r and "loss/flow_grpo" in r
    assert all("loss/grpo_reason" not in r for r in refine)
    for r in (rows[0], rows[2], rows[4]):  # round 0 of every evaluation is drawn from a plan
        assert 0.0 <= r["eval/reason/plan_satisfied"] <= 1.0 and r["eval/reason/plan_length"] > 0
        assert 0.0 <= r["eval/gold/round0_acc"] <= 1.0
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert cfg.rollout.reason is True


def test_plans_condition_the_generator_and_show_in_the_grids(recipe: Path, tmp_path: Path) -> None:
    from r3rl.evaluate import evaluate_run
    from r3rl.run import build_run

    run = build_run(load_config(recipe, [f"output_dir={tmp_path}", "eval.rounds=1"]), for_training=False)
    result = evaluate_run(run)
    assert all(" | plan: " in c for c in result.captions[0])
    seen = []
    real = run.generator.model.encode_text
    run.generator.model.encode_text = lambda texts, **kw: seen.extend(texts) or real(texts, **kw)
    evaluate_run(run)
    plans = [c.split(" | plan: ", 1)[1] for c in result.captions[0]]
    assert [f"{m['prompt']}. {p}" for m, p in zip(run.eval_prompts, plans)] == seen[: len(plans)]


def test_reason_works_with_tree_credit_and_with_a_frozen_generator(recipe: Path, tmp_path: Path) -> None:
    from r3rl.run import build_run
    from r3rl.trainer import train_step

    cfg = load_config(recipe, [f"output_dir={tmp_path}", "rollout.credit=tree", "rollout.group_size=2",
                               "rollout.tree_k=2", "rollout.tree_m=1"])
    m = train_step(build_run(cfg), 1)
    assert m["stage"] == "tree" and "loss/grpo_reason" in m and "loss/grpo" in m and "reason/plan_length" in m

    cfg = load_config(recipe, [f"output_dir={tmp_path}", "generator.train=false", "reflector.loss_type=dr_grpo"])
    run = build_run(cfg)
    gen_before = [p.detach().clone() for p in run.generator.model.transformer.parameters()]
    refl_before = [p.detach().clone() for p in run.reflector.model.parameters()]
    m = train_step(run, 1)  # the plans train on generate steps even when the generator does not
    assert m["stage"] == "generate" and math.isfinite(m["loss/grpo_reason"])
    assert all(torch.equal(a, b) for a, b in zip(gen_before, run.generator.model.transformer.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(refl_before, run.reflector.model.parameters()))


@pytest.mark.timeout(900)
def test_resume_with_reason_matches_an_uninterrupted_run(recipe: Path, tmp_path: Path) -> None:
    extra = ("trainer.eval_every=0", "trainer.save_every=1")
    full = _cli(recipe, tmp_path / "full", *extra)
    _cli(recipe, tmp_path / "cut", *extra, "trainer.max_steps=1")
    resumed = _cli(recipe, tmp_path / "cut", *extra, "resume=auto")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    assert strip(resumed) == strip(full)


@pytest.mark.timeout(900)
def test_reason_on_two_processes_matches_one_process(tmp_path: Path) -> None:
    extra = ("rollout.reason=true", "rollout.reason_max_new_tokens=12", "reflector.loss_type=dapo")
    one = _train(tmp_path / "one", tmp_path / "cache", *extra)
    two = _train(tmp_path / "two", tmp_path / "cache", *extra, nproc=2)
    assert [r["stage"] for r in two[1:]] == ["generate", "refine"]
    must = {"loss/grpo_reason", "reason/plan_length", "reason/plan_satisfied", "loss/flow_grpo", "grad_norm"}
    assert must <= set(one[1])
    for step in (1, 2):
        for key, a in one[step].items():
            if key.startswith("time/") or not isinstance(a, float) or key == "reason/entropy":
                continue
            b = two[step][key]
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (step, key, a, b)


REAL = ["r3_qwen25vl_flux_kontext", "r3_qwen25vl_sd35_kontext", "r3_qwen25vl_qwen_image_edit"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("recipe_name", REAL)
def test_real_recipes_turn_reason_on_and_train_a_plan_step(recipe_name: str, tiny, tmp_path: Path) -> None:
    """Each real recipe, its models swapped for tiny ones of the same families (tests/test_recipes.py),
    trains one generate step with `rollout.reason=true` (R3's planning prompt, plans GRPO-trained)."""
    from test_recipes import _overrides

    path = Path(__file__).parents[1] / "recipes" / f"{recipe_name}.yaml"
    args = _overrides(path, tiny, tmp_path / "run")
    assert load_config(path, args).rollout.reason is False  # a switch, off as shipped
    cfg = load_config(path, [*args, "rollout.reason=true"])
    r = reasoner(cfg)
    assert r.prompt == R3_PLAN_PROMPT and r.max_new_tokens == 256 and r.checker is None
    assert r.turns(["a cat"])[0].endswith("image here.\na cat")
    rows = _cli(path, tmp_path / "run", *args, "rollout.reason=true", "rollout.reason_max_new_tokens=8")
    assert rows[1]["stage"] == "generate" and math.isfinite(rows[1]["loss/grpo_reason"])
    assert rows[1]["reason/plan_length"] > 0 and "reason/plan_satisfied" not in rows[1]  # no parser: not logged
