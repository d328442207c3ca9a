"""End-to-end: one tiny recipe trains in every refinement mode by switching `refiner.mode`
(the real `r3rl train` CLI), with the shapes world's FLUX.1-Kontext refiner or a tiny
Qwen-Image-Edit one, and evaluation reports region preservation in region mode."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_world_yaml

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """A recipe whose world (and regenerate stage) pretrains in seconds, shared by the module."""
    root = tmp_path_factory.mktemp("modes")
    path = root / "tiny.yaml"
    path.write_text(f"""
{tiny_world_yaml(root)}
generator: {{train: false, num_steps: 3}}
refiner: {{num_steps: 3, lr: 1.0e-3, region: {{box: [0.25, 0.25, 0.75, 0.75]}},
          regenerate: {{pretrain_steps: 4, pretrain_pairs: 16}}}}
rollout: {{group_size: 3, max_rounds: 2, perfect_prob: 0}}
trainer: {{max_steps: 2, eval_every: 0, save_every: 0}}
eval: {{rounds: 1, num_steps: 3, batch_size: 4}}
data: {{num_eval_prompts: 4}}
rewards: [{{name: "{FIXTURES / 'noisy_reward.py'}:noisy_reward"}}, {{name: background_preservation, weight: 0.1}}]
""")
    return path


def _train(recipe: Path, out: Path, *overrides: str) -> list[dict]:
    # 120 SFT steps: with planning batches among them (world v7) 60 left the tiny reflector stopping on everything
    proc = subprocess.run([sys.executable, "-m", "r3rl.cli", "train", str(recipe), f"output_dir={out}",
                           "world.pretrain_reflector_steps=120", *overrides],
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["edit", "regenerate", "region"])
def test_every_mode_trains_from_the_same_recipe(recipe: Path, tmp_path: Path, mode: str) -> None:
    rows = _train(recipe, tmp_path, f"refiner.mode={mode}")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert {r["stage"] for r in rows[1:]} == {"refine"}
    assert all(math.isfinite(r["reward/mean"]) for r in rows[1:])
    assert "eval/round1_mean" in rows[0] and rows[0]["eval/round1_improved"] > 0  # the refiner did act
    assert any(math.isfinite(r.get("loss/flow_grpo", math.nan)) for r in rows[1:])
    assert ("eval/ssim_bg" in rows[0]) == (mode == "region")  # only region mode has a region to preserve
    if mode == "region":  # the default paste mask feathers inside the box: the background is the input's
        assert rows[0]["eval/mse_bg"] == 0.0 and rows[0]["eval/ssim_bg"] == 1.0
    if mode == "regenerate":  # its extra pretraining is a separate cached stage beside the world
        assert len(list((recipe.parent / "cache").glob("shapes-*-regenerate-*/COMPLETE"))) == 1


@pytest.fixture(scope="module")
def qwen_image_edit(recipe: Path, tokenizer) -> Path:
    """A tiny random-weight Qwen-Image-Edit checkpoint at the world's image size."""
    from r3rl.models.tiny import build_tiny_qwen_image_edit

    path = recipe.parent / "qwen_image_edit"
    build_tiny_qwen_image_edit(tokenizer, 32, seed=0).save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", ["regenerate", "region"])
def test_qwen_image_edit_refiner_trains_in_mode(recipe: Path, qwen_image_edit: Path, tmp_path: Path,
                                                mode: str) -> None:
    """Its text encoder reads the image the mode conditions on (the input, or the region's crop);
    what each mode does to the pixels is checked in-process in test_region / test_family_diffusion."""
    stages = set((recipe.parent / "cache").glob("shapes-*-regenerate-*"))
    rows = _train(recipe, tmp_path, f"refiner.mode={mode}", f"refiner.model={qwen_image_edit}", "trainer.max_steps=1")
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["stage"] == "refine"
    assert math.isfinite(rows[1]["loss/flow_grpo"]) and rows[0]["eval/round1_improved"] > 0
    if mode == "region":  # only pixels inside the box changed
        assert rows[0]["eval/mse_bg"] == 0.0 and rows[0]["eval/ssim_bg"] == 1.0
    else:  # a Qwen-Image-Edit refiner is its own semantic encoder: no shapes regenerate stage is trained
        assert set((recipe.parent / "cache").glob("shapes-*-regenerate-*")) == stages


def test_non_edit_modes_refuse_tree_credit_in_one_line(recipe: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "r3rl.cli", "train", str(recipe), f"output_dir={tmp_path}",
                           "refiner.mode=region", "rollout.credit=tree"], check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "r3rl: error: refiner.mode='region' needs rollout.credit='r3'; tree credit refines in 'edit' mode only")
