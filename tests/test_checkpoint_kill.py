"""A run SIGKILLed while writing a checkpoint resumes from the previous complete one, and the
resumed run reproduces the uninterrupted run's metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_world_yaml

FIXTURES = Path(__file__).parent / "fixtures"

# the real trainer, killed by SIGKILL halfway through writing step 3's checkpoint
KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import r3rl.checkpoint as ck
    from r3rl.config import load_config
    from r3rl.trainer import train

    write_rest = ck._write_rest
    def dying(run, tmp, final, step, *args):
        if step == 3:
            (tmp / "trainer_state.json").write_text('{"step": 3')  # half-written
            os.kill(os.getpid(), signal.SIGKILL)
        write_rest(run, tmp, final, step, *args)
    ck._write_rest = dying
    train(load_config(sys.argv[1], sys.argv[2:]))
""")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill")
    path = root / "tiny.yaml"
    path.write_text(f"""
{tiny_world_yaml(root)}
generator: {{train: true, num_steps: 3, lr: 1.0e-3}}
refiner: {{num_steps: 3, lr: 1.0e-3}}
rollout: {{group_size: 3, max_rounds: 2}}
trainer: {{max_steps: 4, eval_every: 0, save_every: 1, keep_last: 3, log_images_every: 0}}
eval: {{rounds: 1, num_steps: 2, batch_size: 4}}
data: {{num_eval_prompts: 2}}
rewards: [{{name: "{FIXTURES / 'noisy_reward.py'}:noisy_reward"}}]
""")
    return path


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, timeout=600)


def test_sigkill_mid_checkpoint_resumes_from_previous_complete_one(recipe: Path, tmp_path: Path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _run("-m", "r3rl.cli", "train", str(recipe), f"output_dir={full}").returncode == 0
    killed = _run("-c", KILL_MID_SAVE, str(recipe), f"output_dir={cut}")
    assert killed.returncode == -signal.SIGKILL
    ckpts = cut / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step-1", "step-2"]
    assert [p for p in ckpts.iterdir() if p.name.startswith(".tmp-step-3")]  # the half-written one
    resumed = _run("-m", "r3rl.cli", "train", str(recipe), f"output_dir={cut}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    err = resumed.stderr.replace("\n", "")  # the console wraps long lines
    assert "resumed from" in err and "step-2 at step 2" in err
    assert _rows(cut) == _rows(full)  # steps 3-4 equal the uninterrupted run's
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-3", "step-4"]  # half-written one removed
