"""`r3rl refine` and `r3rl eval` outputs, on a run trained once (2 steps) with the real CLI."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from r3rl.cli import main
from r3rl.models.reflector import HFReflector, Reflection
from r3rl.shapes.prompts import shapes_prompts, write_jsonl
from rewards.shapes_geneval import ShapesGenEval

REPO = Path(__file__).resolve().parents[1]
TRACE_KEYS = {"prompt", "metadata", "rounds", "final_image", "final_reward"}
ROUND_KEYS = {"round", "image", "reflection", "instruction", "reward"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny run (world pretrains in seconds) trained for 2 steps, checkpointing every step."""
    root = tmp_path_factory.mktemp("inference")
    recipe = root / "tiny.yaml"
    recipe.write_text(f"""
output_dir: {root / "run"}
world: {{pretrain_vae_steps: 4, pretrain_diffusion_steps: 4, pretrain_reflector_steps: 2,
        reflector_sft_examples: 16, pretrain_batch_size: 4, cache_dir: {root / "cache"}}}
reflector: {{max_new_tokens: 12}}
generator: {{train: true, num_steps: 3}}
refiner: {{num_steps: 3}}
rollout: {{group_size: 2}}
trainer: {{max_steps: 2, eval_every: 0, save_every: 1}}
eval: {{rounds: 1, num_steps: 3, batch_size: 4}}
data: {{num_eval_prompts: 4}}
""")
    proc = subprocess.run(
        [sys.executable, "-m", "r3rl.cli", "train", str(recipe)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    prompts = root / "prompts.jsonl"
    # 3 shapes prompts + 1 without GenEval metadata (shapes_geneval cannot score it: reward null)
    write_jsonl([*shapes_prompts("eval", 3), {"prompt": "a photo of something", "id": 7}], prompts)
    return {"root": root, "recipe": recipe, "run": root / "run", "prompts": prompts}


def _trace(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]


def _check_trace(out: Path, prompts: Path, rounds: int) -> list[dict]:
    """Structure of trace.jsonl, the PNGs it names, and rewards equal to the checker's score of those PNGs."""
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    trace = _trace(out)
    assert len(trace) == len(records)
    checker = ShapesGenEval()
    written = set()
    for i, (t, rec) in enumerate(zip(trace, records)):
        assert set(t) == TRACE_KEYS
        assert t["prompt"] == rec["prompt"]
        assert t["metadata"] == {k: v for k, v in rec.items() if k != "prompt"}
        rs = t["rounds"]
        assert [r["round"] for r in rs] == list(range(len(rs))) and 1 <= len(rs) <= rounds + 1
        assert rs[0]["reflection"] is None and rs[0]["instruction"] is None
        for r in rs:
            assert set(r) == ROUND_KEYS
            if r["round"] == 0 or r["instruction"] is not None:  # a new image, named by its round
                assert r["image"] == f"{i:04d}_round{r['round']}.png"
                written.add(r["image"])
            else:  # the stop: no further edit, same image and reward as the round before
                assert r["reflection"] is not None
                assert r is rs[-1]
                prev = rs[r["round"] - 1]
                assert (r["image"], r["reward"]) == (prev["image"], prev["reward"])
            image = Image.open(out / r["image"]).convert("RGB")
            expected = checker([t["prompt"]], [image], [rec])[0]
            assert r["reward"] == expected, (i, r)
        assert t["final_image"] == rs[-1]["image"] and t["final_reward"] == rs[-1]["reward"]
    assert trace[-1]["rounds"][0]["reward"] is None  # no `include`: could not score, not 0
    assert {p.name for p in out.glob("*.png")} == written
    return trace


def test_refine_cli_saves_every_round_and_a_trace(trained, tmp_path: Path) -> None:
    out = tmp_path / "refined"
    ckpt = trained["run"] / "checkpoints" / "step-2"
    proc = subprocess.run(
        [sys.executable, "-m", "r3rl.cli", "refine", "--checkpoint", str(ckpt), "--prompts",
         str(trained["prompts"]), "--rounds", "2", "--out", str(out), "--temperature", "1.0"],
        check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 prompts" in proc.stdout
    _check_trace(out, trained["prompts"], rounds=2)


def test_refine_loads_checkpoint_weights(trained, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from r3rl.inference import load_trained, resolve_checkpoint

    # an output_dir means its newest complete checkpoint
    assert resolve_checkpoint(trained["run"]) == trained["run"] / "checkpoints" / "step-2"
    # two steps on a tiny world may leave the reflector where pretraining left it (the checker scores
    # every junk image 0, so its group's advantages can all be 0): mark a copy of the checkpoint's
    # reflector so that loading the world's instead would show
    run_dir = tmp_path / "run"
    shutil.copytree(trained["run"], run_dir)
    weights = run_dir / "checkpoints" / "step-2" / "reflector" / "model.safetensors"
    tensors = load_file(weights)
    first = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[first] = tensors[first] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    run, ckpt = load_trained(run_dir)
    for name in ("generator", "refiner"):
        folder = ckpt / name / "transformer"
        if not folder.exists():
            continue
        saved = load_file(next(folder.glob("*.safetensors")))
        state = getattr(run, name).model.transformer.state_dict()
        assert saved and all(state[k].equal(v) for k, v in saved.items())
    # the reflector: as transformers loads the checkpoint, and not the world's pretrained one
    state = run.reflector.model.state_dict()
    saved = HFReflector.from_pretrained(ckpt / "reflector").model.state_dict()
    world = HFReflector.from_pretrained(next((trained["root"] / "cache").iterdir()) / "reflector")
    assert state.keys() == saved.keys() and all(state[k].equal(v) for k, v in saved.items())
    assert any(not world.model.state_dict()[k].equal(v) for k, v in saved.items())


def test_refine_rounds_with_edits_and_early_stop(trained, tmp_path: Path, monkeypatch) -> None:
    """Scripted reflector and diffusion (the 2-step models draw noise that scores 0): every
    sample is edited in round 1; in round 2 the first sample still active stops, the rest are
    edited again. Each prompt's n-th image is blank for even n, a correct scene for odd n, so
    rewards go 0, 1, 0, 1 and the trace must keep each reward with its own PNG."""
    import r3rl.evaluate
    import r3rl.rollout
    from r3rl.inference import refine
    from r3rl.rollout import DiffusionRollout
    from r3rl.shapes.scene import render, sample_scene

    metas = {m["prompt"]: m for m in map(json.loads, trained["prompts"].read_text().splitlines())}
    drawn: dict[str, int] = {}
    calls = []

    def reflect(self, prompts, images, **kwargs):
        calls.append(len(prompts))
        stop = "<think>ok</think> no further edit needed"
        return [Reflection(stop, [1], [0.0], None, True) if len(calls) == 2 and j == 0
                else Reflection(f"<think>x</think> redo: {p}", [1], [0.0], f"redo: {p}", True)
                for j, p in enumerate(prompts)]  # fmt: skip

    def run_diffusion(model, texts, refs, settings, *, train, generator, keep=None):
        images = []
        for text in texts:
            meta = metas[text.removeprefix("redo: ")]
            n = drawn[meta["prompt"]] = drawn.get(meta["prompt"], -1) + 1
            good = n % 2 == 1 and "include" in meta
            images.append(render(sample_scene(meta, random.Random(n)) if good else []))
        return DiffusionRollout(images, None, list(texts), None)

    monkeypatch.setattr(HFReflector, "reflect", reflect)
    monkeypatch.setattr(r3rl.evaluate, "run_diffusion", run_diffusion)
    monkeypatch.setattr(r3rl.rollout, "run_diffusion", run_diffusion)
    out = tmp_path / "scripted"
    trace = refine(trained["run"] / "checkpoints" / "step-1", trained["prompts"], out, rounds=3,
                   batch_size=4, progress=False)  # fmt: skip
    assert calls == [4, 4, 3]
    assert trace == _check_trace(out, trained["prompts"], rounds=3)
    rewards = [[r["reward"] for r in t["rounds"]] for t in trace]
    assert rewards == [[0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0], [None] * 4]
    assert (
        trace[0]["rounds"][2]["instruction"] is None
        and trace[0]["final_image"] == "0000_round1.png"
    )
    assert all(
        r["instruction"] == f"redo: {t['prompt']}" for t in trace[1:] for r in t["rounds"][1:]
    )


def test_eval_writes_round_grids_and_metrics(trained, tmp_path: Path) -> None:
    out = tmp_path / "evalrun"
    proc = subprocess.run(
        [sys.executable, "-m", "r3rl.cli", "eval", str(trained["recipe"]), f"output_dir={out}"],
        check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "eval").iterdir()) == [
        "metrics.json",
        "round0.png",
        "round1.png",
    ]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert {"eval/round0_mean", "eval/round1_mean", "eval/final_mean"} <= set(metrics)
    assert all(v is None or 0.0 <= v <= 1.0 for k, v in metrics.items() if k.endswith("_mean"))
    for k in (0, 1):
        grid = Image.open(out / "eval" / f"round{k}.png")
        assert grid.width > 4 * 32 and grid.height > 32  # 4 samples in a row, captions below


def _refine_error(capsys, checkpoint: Path, prompts: Path, out: Path, *extra: str) -> str:
    """`r3rl refine` fails with exit code 2 and one line on stderr; returns that line."""
    argv = ["refine", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--out", str(out)]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("r3rl: error: "), err
    return err[0]


def test_refine_errors_are_one_line_exit_2(trained, tmp_path: Path, capsys) -> None:
    run, prompts, out = trained["run"], trained["prompts"], tmp_path / "o"
    step = run / "checkpoints" / "step-2"
    line = _refine_error(capsys, tmp_path / "nope", prompts, out)
    assert "not found" in line and "nope" in line
    line = _refine_error(capsys, step, tmp_path / "p.jsonl", out)
    assert "prompt file not found" in line
    line = _refine_error(capsys, step, prompts, out, "--rounds", "-1")
    assert "--rounds" in line
    # a save that was cut off: no COMPLETE marker
    cut = tmp_path / "cut" / "checkpoints" / "step-3"
    shutil.copytree(step, cut)
    (cut / "COMPLETE").unlink()
    line = _refine_error(capsys, cut, prompts, out)
    assert "incomplete checkpoint" in line
    line = _refine_error(capsys, tmp_path / "cut", prompts, out)
    assert "no complete checkpoint" in line
    # COMPLETE but the run's config.yaml missing, or the weights missing
    (cut / "COMPLETE").touch()
    line = _refine_error(capsys, cut, prompts, out)
    assert "config.yaml" in line
    shutil.copy(run / "config.yaml", tmp_path / "cut" / "config.yaml")
    for f in (cut / "reflector").glob("*.safetensors"):
        f.unlink()
    line = _refine_error(capsys, cut, prompts, out)
    assert "incomplete checkpoint" in line and "reflector" in line
    assert not out.exists()
