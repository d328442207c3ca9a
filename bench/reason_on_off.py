"""R3 with and without the Reason stage (`rollout.reason`, issue 19) in the shapes world, on the
gold score, at equal training time.

For each RL seed, on one pretrained world (`world.seed=0`), runs `r3rl train
recipes/shapes_cpu.yaml` with `rollout.reason=true` and `=false` side by side (two processes, one
thread each, so both arms see the same machine load) for `--minutes` of training steps each
(`trainer.max_minutes`: plan sampling counts, evaluation does not). Prints gold accuracy at
round 0 and the final round, step 0 and the end, the plans' satisfied share, and copies each run's
step-0-vs-final grid into bench/grids/.

    python bench/reason_on_off.py [--seeds 0 1 2] [--minutes 4] [--out runs/reason] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRIDS = ROOT / "bench" / "grids"


def start(out: Path, reason: bool, seed: int, minutes: float, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "r3rl.cli", "train", str(ROOT / "recipes/shapes_cpu.yaml"), f"output_dir={out}",
           f"seed={seed}", "world.seed=0", f"rollout.reason={str(reason).lower()}",
           f"trainer.max_minutes={minutes}", "trainer.max_steps=100000", "trainer.save_every=0", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, env=env, stdout=open(out / "stdout.log", "w"), stderr=subprocess.STDOUT)


def ends(out: Path) -> tuple[dict, dict, int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/final_mean" in r]
    return evals[0], evals[-1], max(r["step"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--out", default="runs/reason")
    ap.add_argument("--grids", default="reason", help="name prefix of the grids copied to bench/grids/")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    keys = [("gold r0", "eval/gold/round0_acc"), ("gold final", "eval/gold/final_acc"),
            ("clutter final", "eval/gold/final_clutter"), ("reward final", "eval/final_mean"),
            ("plans satisfied", "eval/reason/plan_satisfied")]
    table: dict[str, list[tuple]] = {"on": [], "off": []}
    for seed in args.seeds:
        procs = {arm: start(Path(args.out) / f"reason_{arm}_seed{seed}", arm == "on", seed, args.minutes,
                            args.overrides) for arm in ("on", "off")}
        for arm, proc in procs.items():
            if proc.wait():
                sys.exit(f"reason={arm} seed {seed} failed: see {Path(args.out) / f'reason_{arm}_seed{seed}'}")
        for arm in ("on", "off"):
            out = Path(args.out) / f"reason_{arm}_seed{seed}"
            first, last, steps = ends(out)
            table[arm].append((seed, steps, first, last))
            grid = out / "grids" / "step0_vs_final.png"
            if grid.exists():
                GRIDS.mkdir(parents=True, exist_ok=True)
                shutil.copy(grid, GRIDS / f"{args.grids}_{arm}_seed{seed}.png")
    head = "| reason | seed | steps | " + " | ".join(f"{k} (step 0 -> end)" for k, _ in keys) + " |"
    print(head)
    print("|" + "---|" * (3 + len(keys)))
    for arm, runs in table.items():
        for seed, steps, first, last in runs:
            cells = [f"{first.get(k, float('nan')):.3f} -> {last.get(k, float('nan')):.3f}" for _, k in keys]
            print(f"| {arm} | {seed} | {steps} | " + " | ".join(cells) + " |")
        for label, k in keys:
            vals = [last.get(k) for _, _, _, last in runs if last.get(k) is not None]
            if vals:
                print(f"mean {arm} {label} end: {statistics.mean(vals):.3f}")


if __name__ == "__main__":
    main()
