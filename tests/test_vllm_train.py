"""R3 training with `reflector.rollout=vllm`: the real `r3rl train` CLI against a REAL vLLM server (CPU).

The reflector here is NOT the shapes world's: that one is a tiny Qwen2.5-VL, whose vLLM model file
imports torchvision, which vLLM's CPU build cannot have (shared env notes). It is the tiny
random-weight Idefics3 the other vLLM tests serve (built from a config, `build_tiny_vllm_vlm`); the
generator and refiner are the shapes world's. A TRL-style text reward, weighted heavily, moves the
reflector's weights every step, so a server that kept its old weights would be caught: every step
the trainer's log-probs of the tokens vLLM sampled must equal vLLM's (IS ratio ~1), and every sync
must pass the probe check within 1e-3.

Skipped only as the other vLLM tests are: R3RL_SKIP_VLLM=1 (the `vllm_judge_model` fixture).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import REPO, start_vllm
from PIL import Image

from r3rl.judges.vllm_server import free_port
from r3rl.models.reflector import HFReflector
from r3rl.models.vllm_rollout import rollout_server_args

pytestmark = pytest.mark.vllm

FIXTURES = Path(__file__).parent / "fixtures"
# a TRL-style text reward that differs between random reflections (their lengths do not: random
# weights rarely stop before max_new_tokens), so the reflector's advantages are not all 0
ODD = "def odd(prompts, completions, completion_ids, **kwargs):\n    return [sum(t % 2 for t in i) / len(i) for i in completion_ids]\n"


def _recipe(root: Path, out: Path, reflector: Path, vllm: str, steps: int) -> Path:
    (root / "odd.py").write_text(ODD)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(f"""output_dir: {out}
world: {{pretrain_vae_steps: 4, pretrain_diffusion_steps: 4, pretrain_pairs: 16, pretrain_reflector_steps: 2,
        reflector_sft_examples: 8, pretrain_batch_size: 8, cache_dir: {root / 'cache'}}}
reflector: {{model: {reflector}, lr: 1.0e-3, max_new_tokens: 10, rollout: vllm, vllm: {vllm}}}
generator: {{train: false, num_steps: 2}}
refiner: {{num_steps: 2, lr: 1.0e-3}}
rollout: {{group_size: 4, max_rounds: 1}}
trainer: {{max_steps: {steps}, eval_every: 0, save_every: 0}}
eval: {{rounds: 1, num_steps: 2, batch_size: 4}}
data: {{num_eval_prompts: 2}}
rewards: [{{name: "{FIXTURES / 'noisy_reward.py'}:noisy_reward"}}, {{name: "{root / 'odd.py'}:odd", weight: 10.0}}]
""")
    return path


def _cli(recipe: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "r3rl.cli", "train", str(recipe), *overrides]


def _env() -> dict[str, str]:
    return dict(os.environ) | {"PYTHONPATH": str(REPO)}


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _probe_logps(path: Path, state: dict | None = None) -> torch.Tensor:
    """The reflector's log-probs of a fixed completion (with `state` loaded, if given)."""
    reflector = HFReflector.from_pretrained(path)
    if state is not None:
        reflector.model.load_state_dict(state)
    image = Image.new("RGB", (32, 32), "red")
    ids = [reflector.encode_completion("a red circle")[:6]] * 1
    logps, mask, _ = reflector.completion_logprobs(["a red circle"], [image], ids, temperature=1.0, top_k=0,
                                                   top_p=1.0, with_grad=False)  # fmt: skip
    return logps[mask]


@pytest.mark.timeout(600)
def test_r3_run_with_vllm_rollouts_syncs_verifies_and_corrects(vllm_judge_model: Path, tmp_path: Path) -> None:
    """`reflector.vllm.launch=true`: the CLI starts the server from .venv-vllm, samples every refine
    step's reflections there, syncs and checks the weights after every reflector step, and stops it."""
    port = free_port()
    vllm = f"{{launch: true, url: 'http://127.0.0.1:{port}/v1', threads: 1, timeout_s: 60}}"
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, out, vllm_judge_model, vllm, steps=3)
    proc = subprocess.run(_cli(recipe), capture_output=True, text=True, timeout=540, env=_env(), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert r["stage"] == "refine"
        # the trainer's log-probs of what vLLM sampled equal vLLM's: the server held this step's weights
        assert 0.0 <= r["rollout/logprob_diff_mean"] < 1e-3, r
        assert r["rollout/is_ratio_mean"] == pytest.approx(1.0, abs=1e-3)
        assert 1.0 - 1e-3 < r["rollout/is_ratio_max"] < 1.0 + 1e-3
        # synced after the step's optimiser step and verified: version = syncs (the first at start)
        assert r["rollout/sync_max_diff"] <= 1e-3
        assert r["rollout/weight_version"] == r["step"] + 1
    assert "verified" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr
    # the weights really moved (so a stale server would have failed the checks above)
    ckpt = out / "checkpoints" / "step-3"
    assert (ckpt / "COMPLETE").exists()
    trained = HFReflector.from_pretrained(ckpt / "reflector")
    before, after = _probe_logps(vllm_judge_model), _probe_logps(vllm_judge_model, trained.model.state_dict())
    assert (before - after).abs().max() > 1e-2
    # no server left behind
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def _torchrun(recipe: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "r3rl.cli", "train", str(recipe), *overrides]  # fmt: skip


@pytest.mark.timeout(600)
def test_two_ranks_share_one_launched_rollout_server(vllm_judge_model: Path, tmp_path: Path) -> None:
    """2 gloo ranks under torchrun, `launch=true`: rank 0 starts the one server, both ranks send their
    share of the requests to it (R3's refine step is one group, one request: rank 0's; a tree level's
    4 roots are 4 requests, 2 per rank), rank 0 syncs and verifies after every reflector step while
    rank 1 waits for the verdict; the IS and sync metrics are logged, the run finishes, the server stops.
    Tree credit, whose levels split their requests between the ranks; R3's refine step (one
    request, rank 0's) is covered by the shared-server test below."""
    port = free_port()
    vllm = f"{{launch: true, url: 'http://127.0.0.1:{port}/v1', threads: 1, timeout_s: 60}}"
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, out, vllm_judge_model, vllm, steps=3)
    overrides = ["rollout.credit=tree", "rollout.tree_k=2", "rollout.tree_m=1"]
    proc = subprocess.run(_torchrun(recipe, *overrides), capture_output=True, text=True, timeout=540, env=_env(), check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert r["stage"] == "tree", r["stage"]
        # both ranks' reflections came from the server holding this step's weights (IS ratio ~1)
        assert 0.0 <= r["rollout/logprob_diff_mean"] < 1e-3, r
        assert r["rollout/is_ratio_mean"] == pytest.approx(1.0, abs=1e-3)
        assert 1.0 - 1e-3 < r["rollout/is_ratio_max"] < 1.0 + 1e-3
        # one sync per step (rank 0's, verified), the version every rank logs
        assert r["rollout/sync_max_diff"] <= 1e-3
        assert r["rollout/weight_version"] == r["step"] + 1
    assert (out / "checkpoints" / "step-3" / "COMPLETE").exists()
    with pytest.raises(httpx.TransportError):  # rank 0's server stopped with the run
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def _kill_server_after_step_one(cmd: list[str], out: Path, server) -> tuple[int, str]:
    """Run `cmd` (a training run logging to `out`), SIGKILL the rollout `server` once step 1 is
    logged, and return the run's exit code and stderr; the run must end within 120 s of the kill."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while not any(r["step"] >= 1 for r in _rows(out)):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no training step logged"
            time.sleep(0.5)
        server.kill()
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and, under torchrun, its ranks
            proc.wait()
    assert time.monotonic() - t0 < 120
    return proc.returncode, stderr


@pytest.fixture
def rollout_server(vllm_judge_model: Path, tmp_path: Path):
    args, env = rollout_server_args()
    server = start_vllm(vllm_judge_model, "tiny-reflector", tmp_path / "server.log", extra_args=args, env=env)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_a_rollout_server_dying_mid_run_is_one_line_and_a_checkpoint(vllm_judge_model: Path, rollout_server,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    """`reflector.vllm.url`: the server is killed after step 1 (SIGKILL, as a crash); the run stops
    within the request timeout with one line naming the server, saves the last completed step (the
    kill may land in a step's rollout or in the sync after its update) and says how to resume."""
    vllm = f"{{url: '{rollout_server.base_url}', timeout_s: 30}}"
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, out, vllm_judge_model, vllm, steps=50)
    returncode, stderr = _kill_server_after_step_one(_cli(recipe), out, rollout_server)
    assert returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "rollout server" in last and "checkpoint" in last and "resume=auto" in last, last
    # the last logged step is the last update (a failed sync after it logs its row first), saved
    done = max(r["step"] for r in _rows(out))
    assert f"checkpoint {out / 'checkpoints' / f'step-{done}'}" in last
    assert (out / "checkpoints" / f"step-{done}" / "COMPLETE").exists()


@pytest.mark.timeout(600)
def test_two_ranks_on_a_shared_server_log_what_one_process_logs(vllm_judge_model: Path, rollout_server,
                                                                tmp_path: Path) -> None:  # fmt: skip
    """Same server (`url`), same recipe: 2 ranks (group 4 = 2 x 2) log the losses, rewards, IS and sync
    metrics 1 process logs; each run's first sync puts the initial weights back on the server."""
    vllm = f"{{url: '{rollout_server.base_url}', timeout_s: 60}}"
    rows = {}
    for name, cmd in (("one", _cli), ("two", _torchrun)):
        out = tmp_path / name
        recipe = _recipe(tmp_path, out, vllm_judge_model, vllm, steps=2)
        proc = subprocess.run(cmd(recipe), capture_output=True, text=True, timeout=300, env=_env(), check=False,
                              cwd=REPO)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[name] = _rows(out)
    one, two = rows["one"], rows["two"]
    assert [r["step"] for r in two] == [0, 1, 2]
    for a, b in zip(one[1:], two[1:]):
        compared = [k for k in a if isinstance(a[k], float) and not k.startswith("time/") and k != "rollout/sync_s"]
        assert {"loss/grpo", "reward/mean", "rollout/is_ratio_mean", "rollout/weight_version"} <= set(compared)
        for key in compared:
            x, y = a[key], b[key]
            assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5), (key, x, y)


@pytest.mark.timeout(600)
def test_two_ranks_stop_together_when_the_shared_server_dies(vllm_judge_model: Path, rollout_server,
                                                             tmp_path: Path) -> None:  # fmt: skip
    """2 ranks on one `url` server, killed after step 1: both ranks raise the same error (the rank whose
    request failed still joins the gather, rank 0's failed sync is told to rank 1), save the checkpoint
    together and exit within the request timeout, none left waiting at a collective."""
    vllm = f"{{url: '{rollout_server.base_url}', timeout_s: 30}}"
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, out, vllm_judge_model, vllm, steps=50)
    returncode, stderr = _kill_server_after_step_one(_torchrun(recipe), out, rollout_server)
    assert returncode != 0
    lines = [line for line in stderr.splitlines() if "rollout server" in line and "resume=auto" in line]
    assert len(lines) == 2, stderr[-3000:]  # one line from each rank
    done = max(r["step"] for r in _rows(out))
    assert all(f"checkpoint {out / 'checkpoints' / f'step-{done}'}" in line for line in lines), lines
    assert (out / "checkpoints" / f"step-{done}" / "COMPLETE").exists()


def test_an_unreachable_rollout_server_stops_before_training(vllm_judge_model: Path, tmp_path: Path) -> None:
    """Nobody listens at the URL: one line naming it, exit 2, before any step."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, out, vllm_judge_model, f"{{url: '{url}', timeout_s: 5}}", steps=2)
    proc = subprocess.run(_cli(recipe), capture_output=True, text=True, timeout=280, env=_env(), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert url in last and "not up" in last, last
    assert not (out / "checkpoints").exists()
