"""Every shipped real-model recipe runs one training step through the real CLI, with its model
paths swapped for tiny random-weight checkpoints of the same families (saved like real ones)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from r3rl.config import load_config
from r3rl.models.registry import detect_family

REPO = Path(__file__).resolve().parents[1]
# text-only recipes (rollout.credit: text) run in tests/test_text_grpo.py; the shapes recipe everywhere
TEXT_RECIPES = {"grpo_text.yaml"}
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if p.name not in {"shapes_cpu.yaml", *TEXT_RECIPES})
SIZE = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny checkpoints per family, plus a GenEval-style prompt file."""
    from r3rl.models.tiny import build_tiny_qwen_image, build_tiny_qwen_image_edit, build_tiny_sd3
    from r3rl.shapes.critique import corpus
    from r3rl.shapes.prompts import shapes_prompts, write_jsonl
    from r3rl.shapes.tiny_diffusion import build_tiny_flux
    from r3rl.shapes.tiny_reflector import build_tiny_reflector

    root = tmp_path_factory.mktemp("tiny_models")
    build_tiny_reflector(corpus(), SIZE).save_pretrained(root / "reflector")
    build_tiny_flux(tokenizer, SIZE).save_pretrained(root / "flux")
    build_tiny_sd3(tokenizer, SIZE).save_pretrained(root / "sd3")
    build_tiny_qwen_image(tokenizer, SIZE).save_pretrained(root / "qwen_image")
    build_tiny_qwen_image_edit(tokenizer, SIZE).save_pretrained(root / "qwen_image_edit")
    write_jsonl(shapes_prompts("train", 8), root / "train.jsonl")
    write_jsonl(shapes_prompts("eval", 2), root / "eval.jsonl")
    return {"root": root}


def _sections(raw: dict) -> list[str]:
    """The diffusion sections a recipe sets (a generator-only recipe has no refiner)."""
    return [s for s in ("generator", "refiner") if s in raw]


def _overrides(recipe: Path, tiny: dict[str, Path], out: Path) -> list[str]:
    """Same recipe, tiny sizes: each model path is replaced by the tiny checkpoint of its family.
    Dtypes (bfloat16) and gradient checkpointing stay as shipped: the CPU runs them too."""
    raw = yaml.safe_load(recipe.read_text())
    root = tiny["root"]
    swaps = []
    if "reflector" in raw:
        swaps += [f"reflector.model={root / 'reflector'}", "reflector.max_new_tokens=8"]
    for section in _sections(raw):
        family = _family_of(raw[section]["model"])
        swaps.append(f"{section}.model={root / family}")
        swaps.append(f"{section}.num_steps=2")
    return [
        *swaps, f"output_dir={out}", "world.image_size=32", f"data.train_prompts={root / 'train.jsonl'}",
        f"data.eval_prompts={root / 'eval.jsonl'}", "data.num_eval_prompts=2", "rollout.group_size=2",
        "trainer.max_steps=1", "trainer.grad_accum=1", "trainer.eval_every=0", "flow_grpo.num_train_timesteps=1",
        "trainer.save_every=1", "trainer.log_images_every=0", "eval.rounds=1", "eval.num_steps=2",
        "eval.batch_size=2", "deterministic=true", "resume=null",
        # judges need a server; the tiny images are scored by the shapes checker instead
        "rewards=[{name: shapes_geneval, args: {partial_credit: true}}]",
    ]


def _family_of(path: str) -> str:
    """The family a recipe's official checkpoint folder name stands for."""
    name = path.lower()
    if "stable-diffusion-3" in name:
        return "sd3"
    if "qwen-image-edit" in name:
        return "qwen_image_edit"
    return "qwen_image" if "qwen-image" in name else "flux"


def test_every_real_recipe_is_shipped():
    assert {p.name for p in RECIPES} >= {"r3_qwen25vl_flux_kontext.yaml", "r3_qwen25vl_sd35_kontext.yaml",
                                         "r3_qwen25vl_qwen_image_edit.yaml", "flow_grpo_sd35.yaml"}
    for name in TEXT_RECIPES:  # really text-only, so skipping them here skips nothing R3
        assert yaml.safe_load((REPO / "recipes" / name).read_text())["rollout"]["credit"] == "text"


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_one_step_on_tiny_models(recipe, tiny, tmp_path):
    out = tmp_path / "run"
    args = _overrides(recipe, tiny, out)
    cfg = load_config(recipe, args)  # the shipped recipe validates with only these swaps
    raw = yaml.safe_load(recipe.read_text())
    for section in _sections(raw):
        assert detect_family(getattr(cfg, section).model) == _family_of(raw[section]["model"])
    proc = subprocess.run(
        [sys.executable, "-m", "r3rl.cli", "train", str(recipe), *args], check=False, capture_output=True,
        text=True,
        timeout=300, cwd=REPO, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert "eval/final_mean" in rows[0]
    assert rows[1]["stage"] in ("generate", "refine")
    ckpt = out / "checkpoints" / "step-1"
    assert (ckpt / "COMPLETE").exists()
    assert (ckpt / "reflector").exists() == ("reflector" in raw)  # a generator-only run has none
    # the recipe's bfloat16 weights, with float32 LoRA adapters (bf16 would round their updates away)
    saved = {f"{f}:{k}": t.dtype for f in ckpt.rglob("*.safetensors") for k, t in load_file(f).items()}
    assert any(".lora_" in k for k in saved)
    wrong = [k for k, dt in saved.items() if dt != (torch.float32 if ".lora_" in k else torch.bfloat16)]
    assert not wrong, wrong[:3]


def test_qwen_image_edit_refiner_learns_in_a_refine_step(tiny, tmp_path, monkeypatch):
    """The R3 refine step with a Qwen-Image-Edit refiner: every reflection asks for an edit, the
    refiner's text encoder reads each input image with its instruction, and the FlowGRPO update
    (which reuses the rollout's conditioning) moves its LoRA."""
    from r3rl.models.reflector import Reflection
    from r3rl.run import build_run
    from r3rl.trainer import train_step

    recipe = REPO / "recipes" / "r3_qwen25vl_qwen_image_edit.yaml"
    noisy = REPO / "tests" / "fixtures" / "noisy_reward.py"
    cfg = load_config(recipe, [*_overrides(recipe, tiny, tmp_path / "run"), f"rewards=[{{name: '{noisy}:noisy_reward'}}]",
                               "rollout.perfect_prob=0", "reflector.train=false"])  # the refiner's update alone
    run = build_run(cfg)
    edit = lambda prompts, images, **kw: [Reflection("<think>x</think> make it red", [1], [-1.0], "make it red", True)
                                          for _ in prompts]
    monkeypatch.setattr(run.reflector, "reflect", edit)
    transformer = run.refiner.model.transformer
    before = {n: p.detach().clone() for n, p in transformer.named_parameters() if p.requires_grad}
    row = train_step(run, 1)
    assert row["stage"] == "refine" and row["refine/stop_rate"] == 0.0
    assert math.isfinite(row["loss/flow_grpo"]) and row["frac_reward_zero_std"] == 0.0
    assert any(not torch.equal(p, before[n]) for n, p in transformer.named_parameters() if n in before)
