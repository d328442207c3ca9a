"""`r3rl refine` and `r3rl eval` end to end on tiny real-family checkpoints, through the real CLI.

The shipped real-model recipes run with their model paths swapped for tiny random-weight
checkpoints (Qwen2.5-VL reflector, SD3.5, FLUX.1-Kontext and Qwen-Image-Edit diffusion, LoRA).
The reflector is first taught, by a few SFT steps on noise images, to always answer
`<think>...</think> redraw the shapes`, so every round really goes through the refiner.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_inference import _check_trace  # the trace contract, checked the same way for every family
from test_recipes import _overrides  # the recipe test's tiny-model swaps

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
EDIT = "<think>the shapes are wrong</think> redraw the shapes"
ROUNDS = 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "r3rl.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )


def _args(recipe: Path, root: Path, out: Path) -> list[str]:
    # room for the whole reflection; every eval prompt, every round; rewards as `_check_trace` scores them
    return [
        *_overrides(recipe, {"root": root}, out),
        "reflector.max_new_tokens=16",
        "data.num_eval_prompts=4",
        f"eval.rounds={ROUNDS}",
        "eval.temperature=0",  # greedy: the taught answer, whatever the sampling noise
        "rewards=[{name: shapes_geneval}]",
    ]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> Path:
    """Tiny checkpoints laid out as `test_recipes._overrides` expects, plus prompt files."""
    from r3rl.models.tiny import build_tiny_qwen_image_edit, build_tiny_sd3
    from r3rl.models.tiny_vlm import build_tiny_vlm
    from r3rl.shapes.critique import corpus
    from r3rl.shapes.prompts import shapes_prompts, write_jsonl
    from r3rl.shapes.tiny_diffusion import build_tiny_flux
    from r3rl.shapes.tiny_reflector import sft_reflector

    root = tmp_path_factory.mktemp("family_models")
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    prompts = [m["prompt"] for m in shapes_prompts("train", 8)]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reflector = build_tiny_vlm("qwen2_5_vl", [*corpus(), EDIT], 32)
        sft_reflector(reflector, [(p, im, EDIT) for p, im in zip(prompts, noise)], steps=50,
                      batch_size=8, lr=3e-3)  # fmt: skip
    finally:
        torch.set_num_threads(n)
    reflector.save_pretrained(root / "reflector")
    build_tiny_flux(tokenizer, 32).save_pretrained(root / "flux")
    build_tiny_sd3(tokenizer, 32).save_pretrained(root / "sd3")
    build_tiny_qwen_image_edit(tokenizer, 32).save_pretrained(root / "qwen_image_edit")
    write_jsonl(shapes_prompts("train", 8), root / "train.jsonl")
    # 3 shapes prompts + 1 without GenEval metadata (the checker cannot score it: reward null)
    write_jsonl(
        [*shapes_prompts("eval", 3), {"prompt": "a photo of something", "id": 7}],
        root / "eval.jsonl",
    )
    return root


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> Path:
    """One training step of the SD3.5 + FLUX.1-Kontext recipe (LoRA everywhere); returns output_dir."""
    out = tmp_path_factory.mktemp("family_run") / "run"
    recipe = RECIPES / "r3_qwen25vl_sd35_kontext.yaml"
    proc = _cli("train", str(recipe), *_args(recipe, models, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_refine_cli_on_a_lora_run_of_real_families(models, trained, tmp_path):
    out = tmp_path / "refined"
    prompts = models / "eval.jsonl"
    proc = _cli("refine", "--checkpoint", str(trained), "--prompts", str(prompts), "--rounds", str(ROUNDS),
                "--out", str(out), "--temperature", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 prompts" in proc.stdout
    trace = _check_trace(out, prompts, rounds=ROUNDS)
    for t in trace:  # the taught reflector edits every round: every round's image is the refiner's
        assert [r["instruction"] for r in t["rounds"]] == [None] + ["redraw the shapes"] * ROUNDS
        assert t["final_image"].endswith(f"_round{ROUNDS}.png")
    for k in range(ROUNDS):  # each refined image differs from the one it was refined from
        before = np.asarray(Image.open(out / f"0000_round{k}.png"))
        assert not np.array_equal(before, np.asarray(Image.open(out / f"0000_round{k + 1}.png")))


def test_refine_loads_the_trained_lora_weights(trained, tmp_path):
    """Every weight of the checkpoint, LoRA included, is what inference runs with. The adapters are
    randomised first: one step from B = 0 may leave them at 0, which any loader would reproduce."""
    from safetensors.torch import save_file

    from r3rl.inference import load_trained

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    ckpt = run_dir / "checkpoints" / "step-1"
    files = {
        name: ckpt / name / "transformer" / "diffusion_pytorch_model.safetensors"
        for name in ("generator", "refiner")
    }
    files["reflector"] = ckpt / "reflector" / "adapter_model.safetensors"
    saved = {}
    for name, f in files.items():
        state = load_file(f)
        assert any(".lora_B." in k for k in state)
        saved[name] = {k: torch.randn_like(v) if ".lora_B." in k else v for k, v in state.items()}
        save_file(saved[name], f, metadata={"format": "pt"})
    run, _ = load_trained(run_dir)
    for name in ("generator", "refiner"):
        transformer = getattr(run, name).model.transformer
        state = transformer.state_dict()
        assert saved[name].keys() == state.keys()
        assert all(state[k].equal(v) for k, v in saved[name].items())
        assert not any(p.requires_grad for p in transformer.parameters())
    state = run.reflector.model.state_dict()  # peft saves adapter keys without the adapter name
    assert all(
        state[k.replace(".weight", ".default.weight")].equal(v)
        for k, v in saved["reflector"].items()
    )


@pytest.mark.parametrize("recipe_name", ["r3_qwen25vl_flux_kontext", "r3_qwen25vl_qwen_image_edit"])
def test_eval_cli_on_real_families(models, tmp_path, recipe_name):
    """`r3rl eval`, untrained, of the FLUX.1-Kontext recipe (Kontext as generator and refiner) and of
    the Qwen-Image-Edit one (SD3.5 generator, Qwen-Image-Edit refiner)."""
    out = tmp_path / "evalrun"
    recipe = RECIPES / f"{recipe_name}.yaml"
    proc = _cli(
        "eval", str(recipe), "--prompts", str(models / "eval.jsonl"), *_args(recipe, models, out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (out / "eval").iterdir())
    assert files == ["metrics.json", *(f"round{k}.png" for k in range(ROUNDS + 1))]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert {f"eval/round{k}_mean" for k in range(ROUNDS + 1)} | {"eval/final_mean"} <= set(metrics)
    assert all(0.0 <= metrics[f"eval/round{k}_mean"] <= 1.0 for k in range(ROUNDS + 1))
    assert metrics["eval/mean_rounds_used"] == ROUNDS  # the taught reflector never stops
    for k in range(1, ROUNDS + 1):
        shares = [metrics[f"eval/round{k}_{s}"] for s in ("improved", "worse", "unchanged")]
        assert sum(shares) == pytest.approx(1.0)
    for k in range(ROUNDS + 1):
        grid = Image.open(out / "eval" / f"round{k}.png")
        assert grid.width > 4 * 32 and grid.height > 32  # 4 samples in a row, captions below
