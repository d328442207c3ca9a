"""Shapes-world pretraining from scratch: wall time per stage and peak RSS (issue 4's budget).

    python bench/pretrain_bench.py [recipe] [overrides ...]

Pretrains into a fresh temporary cache with the recipe's `world` settings, prints a table and
appends it to bench/RESULTS.md. Run it alone: the 2-core timings are only meaningful uncontended.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import r3rl.cli  # noqa: F401  (sets the CLI's OpenMP wait policy before torch loads, as `r3rl train` does)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from results import publish


def main() -> None:
    from r3rl.config import load_config
    from r3rl.logger import quiet_libraries
    from r3rl.shapes.world import ensure_world

    recipe = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "recipes/shapes_cpu.yaml")
    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(recipe, [f"world.cache_dir={cache}", *sys.argv[2:]])
        quiet_libraries()
        t0 = time.time()
        paths = ensure_world(cfg.world, cfg.seed)
        wall = time.time() - t0
        stats = json.loads((paths.root / "pretrain.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    text = "\n".join([
        f"## Shapes-world pretraining from scratch ({date.today()}, {os.cpu_count()} CPU cores, no GPU, run alone)",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| wall time | {wall / 60:.2f} min | <= 6 min |",
        f"| stages (s) | {json.dumps(stats['stages'])} | |",
        f"| peak RSS | {peak:.2f} GiB | <= 4 GiB |",
        f"| generator strict accuracy on its SFT prompts | {stats['generator_train_accuracy']} | well below 1 |",
        "",
    ])
    publish(text)


if __name__ == "__main__":
    main()
