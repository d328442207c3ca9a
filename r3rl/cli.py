"""The `r3rl` command line: one subcommand per job, each a small function.

Heavy modules (torch, the trainer) are imported inside the subcommands, so `r3rl --help`
answers at once. User mistakes (`UserError`) print one line and exit 2; so do usage errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from r3rl import __version__
from r3rl.errors import UserError

EXIT_USER_ERROR = 2

# How long idle OpenMP threads spin before sleeping (libgomp, which torch's pip wheels use; must
# precede torch). libgomp's default spin collapses throughput when cores are shared (another job,
# a judge server beside the trainer): 3x slower flow-matching steps than sleeping at once with two
# processes on 2 cores. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a tiny model's many small
# ops 1.7x on idle cores. One process spins briefly, which keeps most of the speed; ranks launched
# side by side share the cores, so they sleep at once (bench/omp_wait_bench.py). A user's setting
# wins.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
    if int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ["GOMP_SPINCOUNT"] = "1000"


def _cmd_train(args: argparse.Namespace) -> int:
    """Train from a recipe."""
    from r3rl.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    if cfg.rollout.credit == "text":
        from r3rl.text_grpo import train_text as train
    else:
        from r3rl.trainer import train

    train(cfg)
    from r3rl.distributed import topology_from_env  # torch is loaded by now

    if cfg.distributed.deepspeed or topology_from_env().distributed:
        _exit_without_teardown(0)
    return 0


def _exit_without_teardown(code: int) -> NoReturn:
    """End a multi-process run once everything is written, skipping interpreter teardown.

    There, gloo's C++ threads intermittently abort the process ("terminate called without an
    active exception", exit -6) after a run that finished and saved; 2 of 8 two-process CPU
    tests failed so in one full-suite run. A known PyTorch problem: gloo work objects still held
    by C++ worker threads are destroyed during interpreter finalisation (pytorch/pytorch#179291,
    whose atexit fix was abandoned; #190489). Exiting directly gives the launcher the true status.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_sft(args: argparse.Namespace) -> int:
    """Supervised flow matching of the recipe's refiner (in its mode) on refiner.sft.data."""
    from r3rl.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    from r3rl.sft import run_sft

    out = run_sft(cfg)
    print(f"wrote the fine-tuned refiner to {out}; train with refiner.model={out}")
    return 0


def _print_metrics(metrics: dict) -> None:
    """Evaluation figures as a two-column table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value")
    for key, value in metrics.items():
        table.add_row(str(key), f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def _cmd_eval(args: argparse.Namespace) -> int:
    """Score rounds 0..N of a recipe's models with the recipe's rewards."""
    from r3rl.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    from r3rl.evaluate import evaluate

    _print_metrics(evaluate(cfg, args.prompts))
    print(f"wrote round grids and metrics.json to {os.path.join(cfg.output_dir, 'eval')}")
    return 0


def _cmd_refine(args: argparse.Namespace) -> int:
    """Generate, reflect and refine with a trained checkpoint; save every round and a trace."""
    from r3rl.inference import TRACE, refine, summarize

    trace = refine(
        args.checkpoint,
        args.prompts,
        args.out,
        rounds=args.rounds,
        temperature=args.temperature,
        num_steps=args.num_steps,
        seed=args.seed,
        batch_size=args.batch_size,
        ema=args.ema,
    )
    print(summarize(trace))
    print(f"wrote images and {TRACE} to {args.out}")
    return 0


def _cmd_rewards_list(args: argparse.Namespace) -> int:
    """List reward names and where each comes from."""
    from r3rl.rewards import available_rewards

    rewards = available_rewards()
    if not rewards:
        print("no rewards installed; give one as path/to/file.py:function")
        return 0
    width = max(len(name) for name in rewards)
    for name, source in rewards.items():
        print(f"{name:<{width}}  {source}")
    return 0


def _cmd_data_shapes(args: argparse.Namespace) -> int:
    """Write a shapes-world prompt file in GenEval format."""
    from r3rl.shapes.prompts import shapes_prompts, write_jsonl

    records = shapes_prompts(args.split, args.n, args.seed)
    write_jsonl(records, args.out)
    print(f"wrote {len(records)} {args.split} prompts to {args.out}")
    return 0


def _cmd_serve_rewards(args: argparse.Namespace) -> int:
    """Host the rewards of a recipe over HTTP (JSON, bearer token) for other nodes."""
    from r3rl.reward_server import serve

    serve(
        args.recipe,
        host=args.host,
        port=args.port,
        token_env=args.token_env,
        max_body_mb=args.max_request_mb,
        max_batch=args.max_batch,
    )
    return 0


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """RECIPE and the dotted overrides that follow it."""
    parser.add_argument(
        "recipe", metavar="RECIPE", help="YAML recipe, e.g. recipes/shapes_cpu.yaml"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides parsed as YAML, e.g. trainer.max_steps=3 resume=auto",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full command tree; a new subcommand is one more `add_parser` block."""
    parser = argparse.ArgumentParser(
        prog="r3rl",
        description="Train image generators that reflect on their own output and refine it.",
    )
    parser.add_argument("--version", action="version", version=f"r3rl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train from a recipe")
    _add_recipe_args(train)
    train.set_defaults(func=_cmd_train)

    sft = commands.add_parser(
        "sft",
        help="supervised flow matching of the refiner on (input, instruction, target[, mask]) "
        "pairs",
    )
    _add_recipe_args(sft)
    sft.set_defaults(func=_cmd_sft)

    evaluate = commands.add_parser("eval", help="score rounds 0..N with the recipe's rewards")
    _add_recipe_args(evaluate)
    evaluate.add_argument(
        "--prompts", metavar="FILE", help="JSONL prompt file (default: the recipe's eval prompts)"
    )
    evaluate.set_defaults(func=_cmd_eval)

    refine = commands.add_parser(
        "refine",
        help="generate -> reflect -> refine with a trained checkpoint; saves images and a trace",
    )
    refine.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="OUTPUT_DIR/checkpoints/step-N, or an output_dir (its newest complete checkpoint)",
    )
    refine.add_argument(
        "--prompts", required=True, metavar="FILE", help="JSONL prompt file (GenEval format)"
    )
    refine.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the images and trace.jsonl"
    )
    refine.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="refine rounds after round 0 (default: the run's eval.rounds)",
    )
    refine.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="reflector temperature, 0 = greedy (default: eval.temperature)",
    )
    refine.add_argument(
        "--num-steps", type=int, metavar="S", help="denoising steps (default: eval.num_steps)"
    )
    refine.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="sampling seed (default: the run's seed + 1, as its eval)",
    )
    refine.add_argument(
        "--batch-size", type=int, metavar="B", help="prompts per batch (default: eval.batch_size)"
    )
    refine.add_argument(
        "--ema",
        action="store_true",
        help="use the averaged weights a trainer.ema run saved (the ones its eval scored)",
    )
    refine.set_defaults(func=_cmd_refine)

    rewards = commands.add_parser("rewards", help="reward plugins")
    rewards_commands = rewards.add_subparsers(
        dest="rewards_command", required=True, metavar="COMMAND"
    )
    rewards_commands.add_parser(
        "list", help="names of available rewards and where each comes from"
    ).set_defaults(func=_cmd_rewards_list)

    data = commands.add_parser("data", help="prompt files")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    shapes = data_commands.add_parser(
        "shapes", help="write a shapes-world prompt file (GenEval format)"
    )
    shapes.add_argument("--split", choices=["train", "eval"], default="train")
    shapes.add_argument("--n", type=int, default=200, help="number of prompts")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--out", required=True, metavar="FILE", help="JSONL file to write")
    shapes.set_defaults(func=_cmd_data_shapes)

    serve_rewards = commands.add_parser(
        "serve-rewards",
        help="host a recipe's rewards over HTTP (JSON, bearer token) for other nodes",
    )
    serve_rewards.add_argument(
        "recipe", metavar="RECIPE", help="YAML recipe, or a YAML file with only a 'rewards' list"
    )
    serve_rewards.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    serve_rewards.add_argument("--port", type=int, default=8750)
    serve_rewards.add_argument(
        "--token-env",
        default="R3RL_REWARD_TOKEN",
        metavar="NAME",
        help="environment variable holding the bearer token callers must send",
    )
    serve_rewards.add_argument(
        "--max-request-mb", type=float, default=64.0, metavar="MB", help="largest request body"
    )
    serve_rewards.add_argument(
        "--max-batch", type=int, default=256, metavar="N", help="most samples in one request"
    )
    serve_rewards.set_defaults(func=_cmd_serve_rewards)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (2 for user errors, 130 when interrupted)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling RECIPE's overrides at the first option; take later ones too.
    if extra and (
        not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)
    ):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except UserError as e:
        message = " ".join(str(e).split("\n"))
        print(f"r3rl: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("r3rl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
