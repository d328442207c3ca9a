"""How OpenMP threads wait: the r3rl CLI's short spin vs sleeping at once vs libgomp's default.

The shapes world's models are tiny, so a step is thousands of small ops and each parallel
region's wake-up cost shows. Times one flow-matching training step of the tiny FLUX world
(batch 32, 2 torch threads) in fresh processes under each policy, first alone, then with two
copies running at once (shared cores: CI, a judge server beside the trainer), and prints the
ratios side by side. Run it alone on the machine.

    python bench/omp_wait_bench.py [--steps 10] [--no-results]
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

POLICIES = {  # what each process gets in its environment before torch loads
    "cli (GOMP_SPINCOUNT=1000)": {"GOMP_SPINCOUNT": "1000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "libgomp default": {},
}
_WAIT_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def _step_seconds(steps: int) -> float:
    """Mean seconds of one flow-matching step (text encoders + transformer, AdamW) on the tiny world."""
    import torch
    from PIL import Image

    from r3rl.shapes.critique import corpus
    from r3rl.shapes.tiny_diffusion import FlowPairs, build_tiny_flux, pretrain_flow
    from r3rl.shapes.tiny_reflector import build_tiny_reflector

    torch.set_num_threads(2)
    flux = build_tiny_flux(build_tiny_reflector(corpus(), 32).tokenizer, 32)
    with torch.no_grad():
        x0 = flux.encode_images([Image.new("RGB", (32, 32), (200, 40, 40))] * 64)
    data = [FlowPairs(["a photo of two red circles and a blue square"] * 64, x0)]
    pretrain_flow(flux, data, steps=2, batch_size=32)  # warm-up: allocator, first-call costs
    t0 = time.perf_counter()
    pretrain_flow(flux, data, steps=steps, batch_size=32)
    return (time.perf_counter() - t0) / steps


def _run(env: dict[str, str], steps: int, copies: int) -> float:
    """Mean step seconds over `copies` concurrent fresh processes with this wait policy."""
    base = {k: v for k, v in os.environ.items() if k not in _WAIT_VARS}
    cmd = [sys.executable, __file__, "--child", str(steps)]
    procs = [subprocess.Popen(cmd, env=base | env, stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(copies)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a benchmark child failed")
    return sum(float(o.split()[-1]) for o in outs) / copies


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(_step_seconds(args.child))
        return {}
    res = {name: {"alone": _run(env, args.steps, 1), "shared": _run(env, args.steps, 2)} for name, env in POLICIES.items()}
    cli = res["cli (GOMP_SPINCOUNT=1000)"]
    lines = [
        f"## OpenMP wait policy ({date.today()}, {os.cpu_count()} CPU cores, no GPU, run alone)",
        "",
        (f"One flow-matching step of the tiny FLUX world (batch 32, 2 torch threads), mean of {args.steps} steps; "
        "'shared' = two copies at once. Ratio = policy's step time / the CLI default's (>1: slower)."),
        "",
        "| policy | alone s/step | shared s/step | alone ratio | shared ratio |",
        "|---|---|---|---|---|",
        *(f"| {n} | {r['alone']:.3f} | {r['shared']:.3f} | {r['alone'] / cli['alone']:.2f} | {r['shared'] / cli['shared']:.2f} |"
          for n, r in res.items()),
        "",
    ]
    publish("\n".join(lines), append=not args.no_results)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
