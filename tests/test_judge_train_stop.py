"""End to end: a judge that goes down mid-run stops `r3rl train` cleanly, with a checkpoint.

The reward is served by the real `r3rl serve-rewards` and called through the `remote` plugin;
after its first call it raises (HTTP 500 on the wire). The run must not crash: the failed
samples are `None`, counted in `judge/failures`, and past `judge.max_failure_rate` the trainer
saves a checkpoint and exits with code 2 and one clear line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, wait_healthy

REPO = Path(__file__).resolve().parents[1]
TOKEN_ENV = "R3RL_TEST_JUDGE_TOKEN"
GROUP = 3


@pytest.fixture(scope="module")
def flaky_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("flaky")
    (root / "flaky.py").write_text(
        textwrap.dedent("""
        import itertools

        _calls = itertools.count()

        def flaky(prompts, images, metadata, **kwargs):
            if next(_calls) >= 1:
                raise RuntimeError("judge overloaded")
            return [0.5] * len(prompts)
    """)
    )
    (root / "rewards.yaml").write_text(f'rewards: [{{name: "{root / "flaky.py"}:flaky"}}]\n')
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "r3rl.cli",
            "serve-rewards",
            str(root / "rewards.yaml"),
            "--port",
            str(port),
            "--token-env",
            TOKEN_ENV,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, TOKEN_ENV: "t0k"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, timeout_s=60, what="serve-rewards")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_train_stops_with_a_checkpoint_when_the_judge_fails(
    flaky_server: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""
output_dir: {out}
world: {{pretrain_vae_steps: 4, pretrain_diffusion_steps: 4, pretrain_pairs: 16, pretrain_reflector_steps: 60,
        reflector_sft_examples: 32, pretrain_batch_size: 8, cache_dir: {tmp_path / "cache"}}}
reflector: {{max_new_tokens: 12}}
generator: {{train: true, num_steps: 3}}
refiner: {{num_steps: 3}}
rollout: {{group_size: {GROUP}, max_rounds: 1}}
trainer: {{max_steps: 5, eval_every: 0, save_every: 0}}
eval: {{rounds: 1, num_steps: 3, batch_size: 4}}
data: {{num_eval_prompts: 4}}
judge: {{max_failure_rate: 0.5}}
rewards:
  - name: remote
    args: {{url: "{flaky_server}", reward: flaky, token_env: {TOKEN_ENV}, timeout_s: 5, max_retries: 1,
           backoff_s: 0.05}}
""")
    proc = subprocess.run(
        [sys.executable, "-m", "r3rl.cli", "train", str(recipe)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, TOKEN_ENV: "t0k", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        "r3rl: error: reward failures 100% exceed judge.max_failure_rate=0.5 at step 1"
    )
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoints" / "step-1" / "COMPLETE").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["judge/failures"] == GROUP
    # one batch, two attempts (max_retries=1) with a short backoff: far below the 2 x 5 s timeouts
    assert rows[1]["time/reward_remote_s"] < 5.0
