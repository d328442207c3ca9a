"""R3 against plain FlowGRPO in the shapes world, on the gold score, at equal training time.

For each RL seed, on one pretrained world (`world.seed`, so the methods and seeds differ only in
RL), runs `r3rl train recipes/shapes_cpu.yaml` with `rollout.credit=r3` and then with
`rollout.credit=flow_grpo`, each for `--minutes` of training steps (`trainer.max_minutes`,
evaluation excluded), evaluating the rounds it trains. Reads step 0 and the end from each
metrics.jsonl, checks design.md §5.1's targets, copies each run's step-0-vs-final grid into
bench/grids/ and appends the table to bench/RESULTS.md.

    python bench/r3_vs_flow_grpo.py [--seeds 0 1 2] [--minutes 4] [--out runs/r3_vs_fg] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from results import publish

GRIDS = ROOT / "bench" / "grids"


def run(out: Path, credit: str, seed: int, minutes: float, overrides: list[str]) -> tuple[dict, dict, float]:
    """Train one method; (step-0 row, last row, wall seconds)."""
    cmd = [sys.executable, "-m", "r3rl.cli", "train", str(ROOT / "recipes/shapes_cpu.yaml"), f"output_dir={out}",
           f"seed={seed}", "world.seed=0", f"rollout.credit={credit}", f"trainer.max_minutes={minutes}",
           "trainer.max_steps=100000", "trainer.save_every=0", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/final_mean" in r]
    return evals[0], evals[-1], time.time() - t0


def verdict_acc(row: dict) -> float:
    """The reflector's gold verdict accuracy; NaN where no reflector ran (plain FlowGRPO logs None)."""
    value = row.get("eval/gold/verdict_acc")
    return float("nan") if value is None else value


def rounds_of(row: dict) -> list[float]:
    ks = sorted(int(k[len("eval/gold/round"):-len("_acc")]) for k in row
                if k.startswith("eval/gold/round") and k.endswith("_acc"))
    return [row[f"eval/gold/round{k}_acc"] for k in ks]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--minutes", type=float, default=4.0, help="training minutes per run (evaluation excluded)")
    ap.add_argument("--out", default="runs/r3_vs_fg")
    ap.add_argument("--no-publish", action="store_true")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for both methods")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    GRIDS.mkdir(exist_ok=True)
    res: dict[tuple[str, int], tuple[dict, dict, float]] = {}
    for seed in args.seeds:
        for credit in ("r3", "flow_grpo"):
            path = out / f"{credit}-seed{seed}"
            shutil.rmtree(path, ignore_errors=True)
            res[credit, seed] = run(path, credit, seed, args.minutes, args.overrides)
            shutil.copy(path / "grids" / "step0_vs_final.png", GRIDS / f"{credit}_seed{seed}_step0_vs_final.png")

    g = "eval/gold/final_acc"
    lines = [
        f"## R3 vs plain FlowGRPO on gold ({date.today()}, {os.cpu_count()} CPU cores, {platform.machine()}, no GPU)",
        "",
        f"Command: `python bench/r3_vs_flow_grpo.py --seeds {' '.join(map(str, args.seeds))} --minutes {args.minutes}"
        f"{' ' + ' '.join(args.overrides) if args.overrides else ''}` · one pretrained world (world.seed=0), "
        f"RL seeds vary; each run trains {args.minutes} min (evaluation excluded). Gold = `eval/gold/*` "
        "(r3rl/shapes/gold.py: all constraints met and no clutter; never a training reward).",
        "",
        "| seed | method | steps | gold final: step 0 -> end | gold per round at the end | clutter end "
        "| trained reward final: step 0 -> end | verdict acc (gold): step 0 -> end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (credit, seed), (first, last, _) in res.items():
        per_round = " / ".join(f"{x:.3f}" for x in rounds_of(last))
        lines.append(
            f"| {seed} | {credit} | {last['step']} | {first[g]:.3f} -> **{last[g]:.3f}** | {per_round} "
            f"| {last['eval/gold/final_clutter']:.3f} | {first['eval/final_mean']:.3f} -> {last['eval/final_mean']:.3f} "
            f"| {verdict_acc(first):.3f} -> {verdict_acc(last):.3f} |"
        )
    r3 = [res["r3", s] for s in args.seeds]
    fg = [res["flow_grpo", s] for s in args.seeds]
    gain = [last[g] - first[g] for first, last, _ in r3]
    vs = [a[1][g] - b[1][g] for a, b in zip(r3, fg)]
    refine = [rounds_of(last)[-1] - rounds_of(last)[0] for _, last, _ in r3]
    worst_drop = max(max((a - b for a, b in zip(rounds_of(last), rounds_of(last)[1:])), default=0.0)
                     for _, last, _ in r3)
    verdict = [verdict_acc(last) - verdict_acc(first) for first, last, _ in r3]
    checks = [
        ("RL raises R3's final-round gold by >= 0.15 on every seed", min(gain) >= 0.15, f"min {min(gain):+.3f}"),
        ("R3 final gold >= FlowGRPO's + 0.05 (mean of seeds)", statistics.mean(vs) >= 0.05,
         f"mean {statistics.mean(vs):+.3f}"),
        ("R3 not below FlowGRPO on any seed", min(vs) >= 0.0, f"min {min(vs):+.3f}"),
        ("final round >= round 0 + 0.05 at the end (mean)", statistics.mean(refine) >= 0.05,
         f"mean {statistics.mean(refine):+.3f}"),
        ("no round below the one before by > 0.01", worst_drop <= 0.01, f"worst drop {worst_drop:.3f}"),
        ("reflector's verdict accuracy (vs gold) rises", min(verdict) > 0.0, f"min {min(verdict):+.3f}"),
    ]
    lines += ["", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else '**no**'} | {value} |" for name, ok, value in checks]
    lines += ["", "Grids (rows: held-out samples; columns: rounds at step 0, then at the end):", ""]
    lines += [f"![{c} seed {s}](grids/{c}_seed{s}_step0_vs_final.png)" for (c, s) in res]
    publish("\n".join(lines) + "\n", append=not args.no_publish)


if __name__ == "__main__":
    main()
