"""Inference with a trained run (`r3rl refine`) and the files `r3rl eval` writes.

`refine` loads a run's resolved recipe (`output_dir/config.yaml`), builds its models with
`build_run(for_training=False)`, loads the checkpoint's weights over them, then runs the same
multi-round loop as evaluation (`evaluate_rounds`: round 0 from the generator, then up to
`rounds` reflect/refine rounds, a sample stopping when its reflection says no further edit is
needed). By default it samples as the run's eval does (its `eval` settings and seed).

Outputs in OUT:
- `{i:04d}_round{k}.png`: prompt i's image after round k, for every round that made an image.
- `trace.jsonl`: one object per prompt, in prompt-file order:
  `{"prompt", "metadata" (the prompt record without "prompt"), "rounds": [...],
  "final_image", "final_reward"}`; each round is `{"round", "image", "reflection",
  "instruction", "reward"}`. Round 0 has `reflection` and `instruction` null. A round whose
  reflection stopped ("no further edit needed") has `instruction` null, makes no new image and
  repeats the previous round's `image` and `reward`; it is the sample's last round. `reward`
  is the recipe's weighted reward (null = a reward could not score it); on refined rounds text
  rewards see the reflection, as in training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from r3rl.errors import UserError

if TYPE_CHECKING:
    import torch

    from r3rl.config import LoRAConfig
    from r3rl.evaluate import EvalResult
    from r3rl.run import Run

TRACE = "trace.jsonl"


# --------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """`.../checkpoints/step-N` as given, or a run's output_dir meaning its newest complete
    checkpoint."""
    from r3rl.checkpoint import COMPLETE, find_resume

    p = Path(path)
    if not p.exists():
        raise UserError(
            f"--checkpoint {path}: not found (expected .../checkpoints/step-N or a run's "
            "output_dir)"
        )
    if (p / COMPLETE).exists():
        return p
    if p.name.startswith(("step-", ".tmp-step-")):
        raise UserError(
            f"--checkpoint {path}: incomplete checkpoint (no {COMPLETE} marker; the save was "
            "interrupted)"
        )
    if (p / "checkpoints").is_dir():
        found = find_resume("auto", p)
        if found is None:
            raise UserError(f"--checkpoint {path}: no complete checkpoint in {p / 'checkpoints'}")
        return found
    raise UserError(
        f"--checkpoint {path}: not a checkpoint (expected .../checkpoints/step-N or a run's "
        "output_dir)"
    )


def _weights(folder: Path, what: str) -> Path:
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"incomplete checkpoint: no {what} weights (*.safetensors) in {folder}")
    return folder


def load_trained(
    checkpoint: str | Path, *, eval_prompts: str | None = None, ema: bool = False
) -> tuple[Run, Path]:
    """The run's models (built from its `config.yaml`) with the checkpoint's weights, or with `ema`
    the averaged weights of the policies it trained (`trainer.ema`); returns (run, checkpoint)."""
    from r3rl.checkpoint import EMA_DIR, load_module
    from r3rl.config import load_config
    from r3rl.run import build_run

    ckpt = resolve_checkpoint(checkpoint)
    recipe = ckpt.parent.parent / "config.yaml"
    if not recipe.is_file():
        raise UserError(f"--checkpoint {checkpoint}: the run's recipe {recipe} is missing")
    cfg = load_config(recipe)
    if ema and not (ckpt / EMA_DIR).is_dir():
        raise UserError(
            f"--ema: checkpoint {ckpt} holds no averaged weights (its run had trainer.ema off)"
        )
    # the average where the run kept one (trained policies), else the live weights
    source = lambda rel: (
        ckpt / EMA_DIR / rel if ema and (ckpt / EMA_DIR / rel).is_dir() else ckpt / rel
    )
    # a generator-only run (credit=flow_grpo) has no reflector
    reflector_dir = (
        None if cfg.rollout.credit == "flow_grpo" else _weights(source("reflector"), "reflector")
    )
    policies = {
        name: _weights(source(f"{name}/transformer"), name)
        for name in ("generator", "refiner")
        if (ckpt / name).exists()
    }
    run = build_run(cfg, eval_prompts=eval_prompts, for_training=False)
    if reflector_dir is not None:
        load_module(run.reflector.model, reflector_dir)
    for name, folder in policies.items():
        _load_transformer(run.policy(name).model.transformer, folder, getattr(cfg, name).lora)
    return run, ckpt


def _load_transformer(transformer: torch.nn.Module, folder: Path, lora: LoRAConfig | None) -> None:
    """Load a trained generator/refiner. A LoRA run's checkpoint holds the peft-injected model
    (`to_q.base_layer.weight`, `to_q.lora_A.default.weight`); the transformer built for inference
    has no adapter, so it gets the recipe's one first, then takes the saved weights as they are."""
    from safetensors import safe_open

    from r3rl.checkpoint import load_module
    from r3rl.models.lora import add_lora

    keys = [k for f in sorted(folder.glob("*.safetensors")) for k in safe_open(f, "pt").keys()]  # noqa: SIM118 (not a dict)
    if any(".lora_" in k for k in keys):
        if lora is None:
            raise UserError(
                f"{folder}: LoRA weights, but the run's recipe has no LoRA for this policy"
            )
        add_lora(transformer, **lora.model_dump())
    load_module(transformer, folder)
    transformer.requires_grad_(False)


# --------------------------------------------------------------------------- refine


def _reward(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def trace_records(
    metas: Sequence[dict], result: EvalResult, first_index: int, out: Path
) -> list[dict]:
    """Save the images of `result` (prompts `first_index`...) into `out`; return their trace
    objects."""
    records = []
    for j, meta in enumerate(metas):
        i = first_index + j
        image = f"{i:04d}_round0.png"
        result.images[0][j].save(out / image)
        reward = _reward(float(result.scores[0, j]))
        rounds = [
            {"round": 0, "image": image, "reflection": None, "instruction": None, "reward": reward}
        ]
        for k in range(1, len(result.images)):
            refl = result.reflections[k][j]
            if refl is None:  # stopped in an earlier round
                break
            reward = _reward(float(result.scores[k, j]))
            if refl.instruction is not None:
                image = f"{i:04d}_round{k}.png"
                result.images[k][j].save(out / image)
            rounds.append(
                {
                    "round": k,
                    "image": image,
                    "reflection": refl.text,
                    "instruction": refl.instruction,
                    "reward": reward,
                }
            )
            if refl.instruction is None:
                break
        records.append(
            {
                "prompt": meta["prompt"],
                "metadata": {key: v for key, v in meta.items() if key != "prompt"},
                "rounds": rounds,
                "final_image": image,
                "final_reward": reward,
            }
        )
    return records


def refine(
    checkpoint: str | Path,
    prompts: str | Path,
    out: str | Path,
    *,
    rounds: int | None = None,
    temperature: float | None = None,
    num_steps: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    ema: bool = False,
    progress: bool = True,
) -> list[dict]:
    """`r3rl refine`: generate, reflect and refine every prompt with a trained run (`ema`: its
    averaged weights); returns the trace.

    Unset settings come from the run's recipe: `eval.rounds`, `eval.temperature`,
    `eval.num_steps`, `eval.batch_size`, and seed `seed + 1` (the seed its eval used).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from r3rl.data import load_prompts
    from r3rl.evaluate import evaluate_rounds
    from r3rl.rollout import TextSettings

    for name, value, low in (
        ("--rounds", rounds, 0),
        ("--num-steps", num_steps, 1),
        ("--batch-size", batch_size, 1),
    ):
        if value is not None and value < low:
            raise UserError(f"{name}={value}: expected an integer >= {low}")
    if temperature is not None and not (temperature >= 0 and math.isfinite(temperature)):
        raise UserError(f"--temperature={temperature}: expected a number >= 0 (0 = greedy)")
    metas = load_prompts(prompts)
    run, _ = load_trained(checkpoint, eval_prompts=str(prompts), ema=ema)
    cfg = run.cfg
    if run.refiner is None and rounds:
        raise UserError(
            f"--rounds {rounds}: this run trained a generator only (rollout.credit=flow_grpo); "
            "it has no reflector or refiner, use --rounds 0"
        )
    rounds = (cfg.eval.rounds if run.refiner is not None else 0) if rounds is None else rounds
    num_steps = cfg.eval.num_steps if num_steps is None else num_steps
    seed = cfg.seed + 1 if seed is None else seed
    bs = batch_size or cfg.eval.batch_size
    text = TextSettings(
        cfg.eval.temperature if temperature is None else temperature,
        run.text.top_k,
        run.text.top_p,
        run.text.max_new_tokens,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(
        "[0-9][0-9][0-9][0-9]_round*.png"
    ):  # from an earlier call into the same folder
        stale.unlink()
    trace: list[dict] = []
    bar = Progress(
        TextColumn("refine"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("prompts"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    with bar, (out / TRACE).open("w", encoding="utf-8") as f:
        task = bar.add_task("refine", total=len(metas))
        for start in range(0, len(metas), bs):
            chunk = metas[start : start + bs]
            # one chunk per call with seed + start: the same samples as one call over all prompts
            result = evaluate_rounds(
                run.reflector,
                run.generator.model,
                None if run.refiner is None else run.refiner.model,
                run.reward,
                chunk,
                rounds=rounds,
                num_steps=num_steps,
                text=text,
                batch_size=bs,
                seed=seed + start,
            )
            for record in trace_records(chunk, result, start, out):
                f.write(json.dumps(record) + "\n")
                trace.append(record)
            f.flush()
            bar.advance(task, len(chunk))
    return trace


def summarize(trace: Sequence[dict]) -> str:
    """One line: prompts, mean reward at round 0 and after the last round, rounds used."""

    def mean(xs: list) -> str:
        xs = [x for x in xs if x is not None]
        return f"{sum(xs) / len(xs):.4f}" if xs else "n/a"

    first = mean([t["rounds"][0]["reward"] for t in trace])
    final = mean([t["final_reward"] for t in trace])
    edits = sum(sum(r["instruction"] is not None for r in t["rounds"]) for t in trace)
    return (
        f"{len(trace)} prompts: mean reward round 0 {first} -> final {final}; {edits} refinements"
    )
