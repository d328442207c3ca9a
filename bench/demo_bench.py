"""The shapes demo as a benchmark: wall time (pretraining + RL), peak RSS, and the R3 claims.

Runs the README's main job (`r3rl train recipes/shapes_cpu.yaml`) in a subprocess with a fresh
model cache, then reads its metrics.jsonl and pretrain.json. Prints a table, writes the
learning-curve PNG and appends a section to bench/RESULTS.md.

    python bench/demo_bench.py [--out runs/demo_bench] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from plot_curves import plot
from results import publish


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/demo_bench")
    ap.add_argument("--keep-cache", action="store_true", help="reuse a pretrained world (times RL only)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    cache = out / "cache"
    if out.exists() and not args.keep_cache:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "r3rl.cli", "train", str(ROOT / "recipes/shapes_cpu.yaml"),
           f"output_dir={out / 'run'}", f"world.cache_dir={cache}", *args.overrides]
    # the CLI picks the OpenMP wait policy (r3rl/cli.py); a shell's own setting would override it
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env)
    wall = time.time() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    rows = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/final_mean" in r]
    first, last = evals[0], evals[-1]
    pre = json.loads(next(cache.glob("shapes-*/pretrain.json")).read_text()) if not args.keep_cache else {}
    png = ROOT / "bench/shapes_curves.png"
    plot(out / "run/metrics.jsonl", png)
    rounds = sorted(int(k[len("eval/round"):-len("_mean")]) for k in last if k.startswith("eval/round") and k.endswith("_mean"))
    lines = [
        (f"## Shapes demo run ({date.today()}, {os.cpu_count()} CPU cores, {platform.machine()}, "
         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU)"),
        "",
        f"Command: `{' '.join(['r3rl', 'train', 'recipes/shapes_cpu.yaml', *args.overrides])}` (fresh cache: {not args.keep_cache})",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| wall time, pretraining + RL | {wall / 60:.1f} min | <= 15 min |",
        f"| pretraining (vae / flow / reflector SFT) | {pre.get('seconds', float('nan')) / 60:.1f} min ({json.dumps(pre.get('stages', {}))}) | <= 6 min |",
        f"| peak RSS | {peak_gib:.2f} GiB | <= 4 GiB |",
        (f"| eval/final_mean step 0 -> step {last['step']} | {first['eval/final_mean']:.3f} -> "
         f"{last['eval/final_mean']:.3f} (+{last['eval/final_mean'] - first['eval/final_mean']:.3f}) | >= +0.15 |"),
    ]
    for k in rounds:
        lines.append(f"| eval/round{k}_mean step 0 -> {last['step']} | {first[f'eval/round{k}_mean']:.3f} -> {last[f'eval/round{k}_mean']:.3f} | |")
    lines += ["", "Learning curves: ![shapes demo](shapes_curves.png)", ""]
    publish("\n".join(lines))


if __name__ == "__main__":
    main()
