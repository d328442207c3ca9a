"""Refinement modes side by side: edit vs regenerate vs region after equal RL training.

Runs `r3rl train recipes/shapes_cpu.yaml` once per `refiner.mode` with the same seed, world
cache, steps and evaluation (the region mode's box is the recipe's `refiner.region.box`, the
shapes world's reflector names no box), reads each run's metrics.jsonl and appends a table to
bench/RESULTS.md: per-round held-out scores at step 0 and at the last step, and for region
mode RefineEval's MSE_bg / SSIM_bg.

    python bench/modes_bench.py [--steps 400] [--out runs/modes_bench] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from results import publish

MODES = ("edit", "regenerate", "region")
BOX = "[0.25,0.25,0.75,0.75]"


def _run(mode: str, out: Path, steps: int, overrides: list[str]) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "r3rl.cli", "train", str(ROOT / "recipes/shapes_cpu.yaml"),
           f"output_dir={out / mode}", f"world.cache_dir={out / 'cache'}", f"refiner.mode={mode}",
           f"refiner.region.box={BOX}", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
           "trainer.save_every=0", *overrides]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    rows = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/final_mean" in r], time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400, help="RL steps per mode (the demo's 400 by default)")
    ap.add_argument("--out", default="runs/modes_bench")
    ap.add_argument("overrides", nargs="*", help="recipe overrides applied to every mode")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {mode: _run(mode, out, args.steps, args.overrides) for mode in MODES}
    rounds = sorted(int(k[len("eval/round"):-len("_mean")]) for k in results["edit"][0][-1]
                    if k.startswith("eval/round") and k.endswith("_mean"))
    head = " | ".join(f"round {k}" for k in rounds)
    lines = [
        f"## Refinement modes after equal training ({date.today()}, {os.cpu_count()} CPU cores, no GPU)",
        "",
        (f"Command: `python bench/modes_bench.py --steps {args.steps} {' '.join(args.overrides)}`: "
        f"`r3rl train recipes/shapes_cpu.yaml refiner.mode=M trainer.max_steps={args.steps}` for each mode, "
        f"same seed and world; region mode refines the box {BOX} (the recipe's; the tiny reflector names none). "
        "Held-out scores (checker, partial credit) per refinement round, step 0 -> last step."),
        "",
        f"| mode | {head} | final | MSE_bg | SSIM_bg | wall min |",
        "|---|" + "---|" * (len(rounds) + 4),
    ]
    for mode, (evals, wall) in results.items():
        first, last = evals[0], evals[-1]
        cells = [f"{first[f'eval/round{k}_mean']:.3f} -> {last[f'eval/round{k}_mean']:.3f}" for k in rounds]
        bg = (f"{last['eval/mse_bg']:.5f} | {last['eval/ssim_bg']:.4f}" if "eval/ssim_bg" in last else "- | -")
        lines.append(f"| {mode} | {' | '.join(cells)} | {first['eval/final_mean']:.3f} -> {last['eval/final_mean']:.3f}"
                     f" | {bg} | {wall / 60:.1f} |")
    publish("\n".join(lines))


if __name__ == "__main__":
    main()
