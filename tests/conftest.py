"""Shared test helpers: the real CLI in a subprocess, fixture paths, and an installed toy plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

# before torch: tests share the cores with the servers and CLI runs they start, so idle OpenMP
# threads sleep at once (the CLI itself spins briefly: r3rl/cli.py, bench/omp_wait_bench.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture
def minimal_recipe() -> Path:
    """A recipe with only the required key and a short run."""
    return FIXTURES / "minimal.yaml"


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """Run `python -m r3rl.cli ARGS` as a user would; `pythonpath` adds plugin directories."""

    def run(
        *args: str, pythonpath: Path | None = None, cwd: Path = REPO
    ) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        paths = [str(p) for p in (pythonpath, REPO) if p is not None]
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return subprocess.run(
            [sys.executable, "-m", "r3rl.cli", *args],
            check=False,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=120,
        )

    return run


@pytest.fixture(scope="session")
def toy_plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A separately *installed* package, `toy-rewards`, that registers rewards through the
    `r3rl.rewards` entry-point group: a dist-info directory next to its module, which is what
    pip leaves in site-packages. Put the returned directory on sys.path to install it.
    """
    site = tmp_path_factory.mktemp("site")
    (site / "toy_rewards_pkg.py").write_text(
        textwrap.dedent("""
        import asyncio

        def exclamations(prompts, images, metadata, **kwargs):
            return [float(p.count("!")) for p in prompts]

        async def slow_half(prompts, images, metadata, **kwargs):
            await asyncio.sleep(0)
            return [0.5 for _ in prompts]

        class Judge:
            def __init__(self, bonus=0.0):
                self.bonus = bonus
                self.loaded = False

            def setup(self):
                self.loaded = True

            def __call__(self, prompts, images, metadata, **kwargs):
                return [self.bonus if self.loaded else None for _ in prompts]
    """)
    )
    dist = site / "toy_rewards-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-rewards\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[r3rl.rewards]\n"
        "toy_exclamations = toy_rewards_pkg:exclamations\n"
        "toy_async = toy_rewards_pkg:slow_half\n"
        "toy_judge = toy_rewards_pkg:Judge\n"
    )
    return site


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: intra-op threads only contend for the shared cores (tens of times slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer():
    """The shapes world's locally trained chat tokenizer."""
    from r3rl.models.tokenizer import train_chat_tokenizer
    from r3rl.shapes.critique import corpus

    return train_chat_tokenizer(corpus())


@pytest.fixture
def tiny_world(tmp_path: Path) -> list[str]:
    """Recipe overrides for a shapes world that pretrains in seconds (its own cache) and steps fast."""
    return [
        f"world.cache_dir={tmp_path / 'cache'}", "world.pretrain_vae_steps=2", "world.pretrain_diffusion_steps=2",
        "world.pretrain_pairs=8", "world.pretrain_reflector_steps=2", "world.reflector_sft_examples=8",
        "world.pretrain_batch_size=4", "reflector.max_new_tokens=6", "generator.num_steps=2", "refiner.num_steps=2",
    ]


def load_bench(name: str):
    """Import `bench/<name>.py` as a module (benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_world_yaml(root: Path) -> str:
    """Recipe lines (output_dir, world, reflector) for a shapes world that pretrains in seconds,
    cached under `root`: the start of the end-to-end tests' tiny recipes."""
    return f"""output_dir: {root / 'run'}
world: {{pretrain_vae_steps: 4, pretrain_diffusion_steps: 4, pretrain_pairs: 16, pretrain_reflector_steps: 60,
        reflector_sft_examples: 32, pretrain_batch_size: 8, cache_dir: {root / 'cache'}}}
reflector: {{lr: 1.0e-3, max_new_tokens: 12}}"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, base: str, *, timeout_s: float, what: str,
                 log: Callable[[], str] = lambda: "") -> None:
    """Poll `base/health` until it answers 200; if the server exits or time runs out, kill it and
    raise with `log()` (its output's tail) in the message."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not start: {log()}")
        time.sleep(0.2)


# ---- a real vLLM server (tests/test_vllm_*.py) ------------------------------------------------
# vLLM lives in its own env, .venv-vllm (scripts/setup_vllm.sh; scripts/test.sh makes it). Tests
# that need it FAIL when it is missing, so CI cannot pass without them; set R3RL_SKIP_VLLM=1 to
# skip them locally instead (test.sh then does not build the env either).
VLLM_SKIP_ENV = "R3RL_SKIP_VLLM"


def vllm_env_or_fail() -> None:
    """Skip if the user opted out, fail with the fix if the vLLM env is not built."""
    if os.environ.get(VLLM_SKIP_ENV) == "1":
        pytest.skip(f"{VLLM_SKIP_ENV}=1: tests against a real vLLM server skipped")
    custom = os.environ.get("R3RL_VLLM_VENV")
    marker = Path(custom) / "bin" / "python" if custom else REPO / ".venv-vllm" / ".r3rl-vllm-stamp"
    if not marker.exists():
        pytest.fail(f"no vLLM env ({marker} missing): run scripts/setup_vllm.sh, or set "
                    f"{VLLM_SKIP_ENV}=1 to skip the tests against a real vLLM server", pytrace=False)


def build_tiny_vllm_vlm(path: Path, corpus: list[str], *, image_size: int = 32, seed: int = 0) -> None:
    """A random-weight Idefics3 that vLLM's CPU build serves (head_dim 32), saved with its
    processor and a tokenizer trained on `corpus` (r3rl.models.tiny_vlm.save_servable_idefics3)."""
    from r3rl.models.tiny_vlm import save_servable_idefics3

    save_servable_idefics3(path, corpus, image_size=image_size, seed=seed)


def start_vllm(model: Path, name: str, log: Path, **kwargs):
    """A started `VLLMServer` for a tiny model: one OpenMP thread, not pinned (shared cores)."""
    from r3rl.judges.vllm_server import VLLMServer

    return VLLMServer(model, served_model_name=name, max_model_len=2048, threads=1,
                      log_path=log, **kwargs).start(timeout_s=240)  # under pytest-timeout's 300 s


@pytest.fixture(scope="session")
def vllm_judge_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny VLM the judge tests serve; its tokenizer knows the judge's prompts."""
    vllm_env_or_fail()
    from rewards.vlm_judge import JSON_PROMPT, SCORE_PROMPT, YES_NO_PROMPT

    corpus = [YES_NO_PROMPT.format(question="is there a red circle in the image? are there 2 squares?"),
              SCORE_PROMPT.format(prompt="a photo of two red circles", low=1, high=10),
              JSON_PROMPT.format(prompt="a photo of a blue square left of a triangle", low=1, high=10),
              "yes no final score: 0 1 2 3 4 5 6 7 8 9 10", '{"score": 7, "reason": "a clear image."}']
    path = tmp_path_factory.mktemp("vllm") / "tiny-idefics3"
    build_tiny_vllm_vlm(path, corpus)
    return path


@pytest.fixture(scope="session")
def vllm_judge_server(vllm_judge_model: Path):
    """A vLLM server on 127.0.0.1 serving the tiny VLM as "tiny-judge" for the whole session."""
    server = start_vllm(vllm_judge_model, "tiny-judge", vllm_judge_model.parent / "server-a.log")
    try:
        yield server
    finally:
        server.stop()
