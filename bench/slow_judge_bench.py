"""Slow judges: R3 steps scored over HTTP by a reward server answering after 200 ms vs 0 ms.

Two `r3rl serve-rewards` processes on 127.0.0.1 host the same reward (the shapes checker,
partial credit) behind a sleep of `--delay` seconds and of 0 s per request. Two runs of the
shapes recipe, identical but for the server they call through the `remote` reward, step in
alternation (so load on the shared machine hits both alike); they do the same work and must
log the same rewards. Ratio = median slow step / median fast step. Target <= 1.10
(design.md §6). With `judge.overlap` (the default) a refine step also begins the next generate
step's rollout, so time moves between the two kinds of step: the mean over whole generate/refine
pairs is reported beside the median. `judge.overlap=false` as an override scores inline.

    python bench/slow_judge_bench.py [--steps 10] [--delay 0.2] [overrides ...]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: shared cores

import argparse
import contextlib
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from results import publish

from r3rl.config import load_config
from r3rl.run import build_run
from r3rl.trainer import train_step

TARGET = 1.10
REWARD = textwrap.dedent("""
    import os, time
    from rewards.shapes_geneval import ShapesGenEval

    _checker = ShapesGenEval(partial_credit=True)

    def delayed_shapes(prompts, images, metadata, **kwargs):
        time.sleep(float(os.environ["BENCH_DELAY_S"]))  # the judge's latency, per request
        return _checker(prompts, images, metadata)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def reward_server(workdir: Path, delay_s: float, token: str) -> Iterator[str]:
    """`r3rl serve-rewards` in a subprocess; yields its URL once /health answers."""
    port = _free_port()
    env = dict(os.environ, BENCH_DELAY_S=str(delay_s), R3RL_REWARD_TOKEN=token,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "r3rl.cli", "serve-rewards", str(workdir / "serve.yaml"),
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"reward server exited: {proc.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError("reward server did not answer /health within 60 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--delay", type=float, default=0.2, help="seconds the slow server waits per request")
    ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("overrides", nargs="*", help="recipe overrides (e.g. a tiny world for tests)")
    args = ap.parse_args(argv)
    token = secrets.token_hex(16)
    os.environ["R3RL_REWARD_TOKEN"] = token  # the remote reward reads the token from here
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "delayed.py").write_text(REWARD)
        (work / "serve.yaml").write_text(f"rewards:\n  - name: {work / 'delayed.py'}:delayed_shapes\n")
        with reward_server(work, 0.0, token) as fast_url, reward_server(work, args.delay, token) as slow_url:
            runs = {}
            for name, url in (("0 ms", fast_url), (f"{args.delay * 1000:.0f} ms", slow_url)):
                remote = f"rewards=[{{name: remote, args: {{url: '{url}', reward: delayed_shapes}}}}]"
                cfg = load_config(ROOT / "recipes/shapes_cpu.yaml", ["trainer.eval_every=0", *args.overrides, remote])
                runs[name] = build_run(cfg)
            times: dict[str, list[float]] = {k: [] for k in runs}
            rewards: dict[str, list[float]] = {k: [] for k in runs}
            for step in range(1, args.warmup + args.steps + 1):
                for name, run in runs.items():
                    t0 = time.perf_counter()
                    row = train_step(run, step)
                    if step > args.warmup:
                        times[name].append(time.perf_counter() - t0)
                    rewards[name].append(row["reward/mean"])
            for run in runs.values():
                run.close()  # a next step's rollout begun early, with its scoring thread
    fast, slow = (statistics.median(v) for v in times.values())
    ratio = slow / fast
    mean_ratio = statistics.mean(times[list(runs)[1]]) / statistics.mean(times[next(iter(runs))])
    same_work = rewards[next(iter(runs))] == rewards[list(runs)[1]]
    lines = [
        (f"## Slow judge: remote reward at {args.delay * 1000:.0f} ms vs 0 ms per request ({date.today()}, "
         f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, {platform.machine()}, no GPU)"),
        "",
        (f"Command: `python bench/slow_judge_bench.py --steps {args.steps} --delay {args.delay}"
         f"{''.join(' ' + o for o in args.overrides)}` · shapes recipe, "
         f"rewards via `remote` -> `r3rl serve-rewards` on 127.0.0.1; median of {args.steps} alternating steps "
         f"after {args.warmup} warm-up; same rewards on both sides: {same_work}"),
        "",
        "| server latency | median s/step | mean s/step |",
        "|---|---|---|",
        *[f"| {k} | {statistics.median(v):.3f} | {statistics.mean(v):.3f} |" for k, v in times.items()],
        f"| **ratio** | **{ratio:.3f}** (target <= {TARGET}) | {mean_ratio:.3f} |",
        "",
    ]
    publish("\n".join(lines), append=not args.no_results)
    return {"ratio": ratio, "mean_ratio": mean_ratio, "times": times, "rewards": rewards,
            "same_work": same_work}


if __name__ == "__main__":
    main()
