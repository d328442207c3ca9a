"""R3 step cost: framework overhead vs the model compute inside a step, and how cost scales.

Overhead: R3 steps of the shapes recipe run with every piece of model compute wrapped by a
timer — HF `generate` and forwards of the reflector, forwards of each diffusion transformer,
text encoder and VAE, `Tensor.backward`, every optimiser's `step`, every reward function. The
ratio is step time / time inside those calls (nested calls counted once); everything else
(tokenising, image conversion, advantage bookkeeping, Python glue) is framework overhead.
Logging and checkpointing are timed separately, per call. Target: ratio <= 1.15 (design.md §6).

Scaling: median step time as the group size grows (R3 credit) and as tree depth grows
(`credit: tree`, `max_rounds` 1..3).

    python bench/r3_step_bench.py [--steps 8] [overrides ...]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: shared cores

import argparse
import contextlib
import functools
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from results import publish

from r3rl.checkpoint import save_checkpoint
from r3rl.config import load_config
from r3rl.logger import RunLogger
from r3rl.run import Run, build_run
from r3rl.trainer import train_step

TARGET = 1.15


class ComputeTimer:
    """Accumulates wall time spent inside wrapped calls; re-entrant calls count once."""

    def __init__(self) -> None:
        self.depth = 0
        self.total = 0.0
        self.by_kind: dict[str, float] = defaultdict(float)

    def wrap(self, kind: str, fn: Callable) -> Callable:
        @functools.wraps(fn)  # keeps the signature: `generate` validates kwargs against forward's
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.depth -= 1
                self.total += dt
                self.by_kind[kind] += dt

        return timed

    def reset(self) -> None:
        self.total = 0.0
        self.by_kind.clear()


@contextlib.contextmanager
def instrument(run: Run, timer: ComputeTimer) -> Iterator[None]:
    """Wrap the model compute of `run` (instance attributes, restored on exit)."""
    patched: list[tuple[object, str, object]] = []

    def patch(obj: object, name: str, kind: str) -> None:
        patched.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, timer.wrap(kind, getattr(obj, name)))

    refl = run.reflector.model
    patch(refl, "generate", "reflector generate")
    patch(refl, "forward", "reflector forward")
    if run.ref_reflector is not None:
        patch(run.ref_reflector.model, "forward", "reflector forward")
    policies = (run.generator, run.refiner)
    for ref in {id(p.ref_transformer): p.ref_transformer for p in policies if p.ref_transformer is not None}.values():
        patch(ref, "forward", "diffusion transformer")
    for m in {id(p.model): p.model for p in policies}.values():
        patch(m.transformer, "forward", "diffusion transformer")
        patch(m.vae, "encode", "vae")
        patch(m.vae, "decode", "vae")
        for enc in (m.text_encoder, m.text_encoder_2):
            patch(enc, "forward", "text encoders")
    for opt in (run.reflector_opt, run.generator.opt, run.refiner.opt):
        if opt is not None:
            patch(opt, "step", "optimiser step")
    fns = run.reward.fns
    originals = list(fns)
    run.reward.fns = [timer.wrap("rewards", f) for f in fns]
    backward = torch.Tensor.backward
    torch.Tensor.backward = timer.wrap("backward", backward)
    try:
        yield
    finally:
        torch.Tensor.backward = backward
        run.reward.fns = originals
        for obj, name, old in reversed(patched):
            if old is None:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def _cfg(overrides: list[str]):
    return load_config(ROOT / "recipes/shapes_cpu.yaml", overrides)


def overhead(overrides: list[str], steps: int, warmup: int) -> dict:
    cfg = _cfg(overrides)
    run = build_run(cfg)
    timer = ComputeTimer()
    rows, ratios, phases = [], [], defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp, instrument(run, timer):
        logger = RunLogger(tmp, total_steps=warmup + steps)
        for step in range(1, warmup + steps + 1):
            timer.reset()
            t0 = time.perf_counter()
            row = train_step(run, step)
            wall = time.perf_counter() - t0
            t1 = time.perf_counter()
            logger.log(step, row)
            t_log = time.perf_counter() - t1
            if step <= warmup:
                continue
            rows.append(row)
            ratios.append(wall / timer.total)
            phases["step"].append(wall)
            phases["model compute"].append(timer.total)
            for kind, sec in timer.by_kind.items():
                phases[kind].append(sec)
            phases["rollout (incl. rewards)"].append(row["time/rollout_s"])
            phases["rewards"].append(sum(v for k, v in row.items() if k.startswith("time/reward_")))
            phases["train"].append(row["time/train_s"])
            phases["logging"].append(t_log)
        t0 = time.perf_counter()
        save_checkpoint(run, Path(tmp), warmup + steps, keep_last=1)
        t_ckpt = time.perf_counter() - t0
        logger.close()
    return {
        "ratio": statistics.median(ratios),
        "phases": {k: statistics.median(v) for k, v in phases.items()},
        "checkpoint_s": t_ckpt,
        "stages": [r["stage"] for r in rows],
    }


def step_time(overrides: list[str], steps: int, warmup: int) -> float:
    run = build_run(_cfg(overrides))
    times = []
    for step in range(1, warmup + steps + 1):
        t0 = time.perf_counter()
        train_step(run, step)
        if step > warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--groups", default="4,8,16")
    ap.add_argument("--rounds", default="1,2,3")
    ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("overrides", nargs="*", help="recipe overrides (e.g. a tiny world for tests)")
    args = ap.parse_args(argv)
    base = ["trainer.eval_every=0", *args.overrides]
    res = overhead(base, args.steps, args.warmup)
    groups = {g: step_time([*base, f"rollout.group_size={g}"], args.steps, args.warmup)
              for g in map(int, args.groups.split(","))}
    tree = {k: step_time([*base, "rollout.credit=tree", "rollout.group_size=4", "rollout.tree_k=2",
                          "rollout.tree_m=1", f"rollout.max_rounds={k}"], args.steps, args.warmup)
            for k in map(int, args.rounds.split(","))}
    lines = [
        (f"## R3 step: framework overhead and scaling ({date.today()}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch threads, {platform.machine()}, no GPU)"),
        "",
        (f"Command: `python bench/r3_step_bench.py --steps {args.steps}` · shapes recipe (pretrained world), "
        f"median of {args.steps} steps after {args.warmup} warm-up · torch {torch.__version__}"),
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| step time / model compute inside it | **{res['ratio']:.3f}** | <= {TARGET} |",
        "",
        "Where a step's time goes (median seconds per step; the model-compute kinds are disjoint):",
        "",
        "| phase | s/step |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in res["phases"].items()],
        f"| checkpoint save (one call, not per step) | {res['checkpoint_s']:.3f} |",
        "",
        "Scaling (median s/step): R3 credit by group size; tree credit (G=4, K=2, M=1) by depth:",
        "",
        "| group size | " + " | ".join(map(str, groups)) + " |",
        "|---|" + "---|" * len(groups),
        "| s/step | " + " | ".join(f"{v:.3f}" for v in groups.values()) + " |",
        "",
        "| tree max_rounds | " + " | ".join(map(str, tree)) + " |",
        "|---|" + "---|" * len(tree),
        "| s/step | " + " | ".join(f"{v:.3f}" for v in tree.values()) + " |",
        "",
    ]
    publish("\n".join(lines), append=not args.no_results)
    return {"overhead": res, "groups": groups, "tree": tree}


if __name__ == "__main__":
    main()
