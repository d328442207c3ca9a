"""`r3rl serve-rewards` run as a user would (the real CLI in a subprocess), called over HTTP.

Security first: no token or a wrong one is 401, big bodies and batches are 413, anything but
JSON is 400, and a pickle that would create a file if loaded is refused without loading it.
Then the `remote` plugin: the same scores as the reward computed locally.
"""

from __future__ import annotations

import base64
import io
import os
import pickle
import random
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_healthy
from PIL import Image

from r3rl.rewards import load_reward
from r3rl.shapes.prompts import shapes_prompts
from r3rl.shapes.scene import render, sample_scene

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-123"
TOKEN_ENV = "R3RL_TEST_REWARD_TOKEN"
MAX_BATCH = 4
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of `r3rl serve-rewards` hosting a checker, a text reward and a broken reward."""
    root = tmp_path_factory.mktemp("serve")
    (root / "extra.py").write_text(
        textwrap.dedent("""
        def broken(prompts, images, metadata, **kwargs):
            raise RuntimeError("detector crashed")

        def words(prompts, completions, **kwargs):  # a TRL-style text reward
            return [float(len(c.split())) for c in completions]
    """)
    )
    (root / "rewards.yaml").write_text(
        textwrap.dedent(f"""
        rewards:
          - {{name: shapes_geneval, args: {{partial_credit: true}}}}
          - {{name: "{root / "extra.py"}:words"}}
          - {{name: "{root / "extra.py"}:broken"}}
    """)
    )
    port = free_port()
    env = {**os.environ, TOKEN_ENV: TOKEN, "PYTHONPATH": str(REPO)}
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
            "--max-batch",
            str(MAX_BATCH),
            "--max-request-mb",
            str(MAX_BYTES / 2**20),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, timeout_s=60, what="serve-rewards", log=lambda: proc.communicate()[0][-2000:])
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _batch(n: int, seed: int = 0) -> tuple[list[str], list[Image.Image], list[dict]]:
    rng = random.Random(seed)
    metas = shapes_prompts("eval", n, seed=seed)
    images = [
        render(sample_scene(m, rng)) if i % 2 else Image.new("RGB", (32, 32), "white")
        for i, m in enumerate(metas)
    ]
    return [m["prompt"] for m in metas], images, metas


def _listening_address(port: int) -> str:
    """The local address of the socket listening on `port`, from the kernel's table (IPv4)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # 0A = LISTEN
            return socket.inet_ntoa(bytes.fromhex(addr)[::-1])
    raise AssertionError(f"nothing listens on port {port}")


def test_binds_loopback_by_default_and_health_needs_no_token(server: str) -> None:
    assert _listening_address(int(server.rsplit(":", 1)[1])) == "127.0.0.1"
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_missing_or_wrong_token_is_401(server: str) -> None:
    url = f"{server}/v1/rewards/shapes_geneval"
    body = {"prompts": ["a photo of a circle"], "images": [_png(Image.new("RGB", (32, 32)))]}
    missing = httpx.post(url, json=body)
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(url, json=body, headers=_auth("not-the-token"))
    assert wrong.status_code == 401 and wrong.json()["error"] == "wrong bearer token"
    assert httpx.get(f"{server}/v1/rewards").status_code == 401
    names = httpx.get(f"{server}/v1/rewards", headers=_auth()).json()["rewards"]
    assert names == ["shapes_geneval", "words", "broken"]


def test_oversized_bodies_and_batches_are_413(server: str) -> None:
    url = f"{server}/v1/rewards/shapes_geneval"
    big = {"prompts": ["p"], "images": ["A" * (MAX_BYTES + 1)]}
    r = httpx.post(url, json=big, headers=_auth())
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count as it reads
        yield b'{"prompts": ["p"], "images": ["'
        for _ in range(MAX_BYTES // 1024 + 1):
            yield b"A" * 1024
        yield b'"]}'

    r = httpx.post(url, content=chunks(), headers={**_auth(), "Content-Type": "application/json"})
    assert r.status_code == 413

    prompts, images, _ = _batch(MAX_BATCH + 1)
    r = httpx.post(
        url, json={"prompts": prompts, "images": [_png(i) for i in images]}, headers=_auth()
    )
    assert r.status_code == 413 and f"limit of {MAX_BATCH}" in r.json()["error"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompts": ["p"', "not valid JSON"),
        (b'{"images": []}', "prompts: Field required"),
        (b'{"prompts": ["a", "b"], "images": ["x"]}', "images has 1 items for 2 prompts"),
        (b'{"prompts": ["a"], "images": ["not base64!"]}', "images[0] is not a base64 PNG"),
        (b'{"prompts": ["a"], "extra": 1}', "extra: Extra inputs are not permitted"),
    ],
)
def test_malformed_requests_are_400_with_a_clear_message(
    server: str, content: bytes, message: str
) -> None:
    r = httpx.post(
        f"{server}/v1/rewards/shapes_geneval",
        content=content,
        headers={**_auth(), "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert message in r.json()["error"]


class _CreatesFile:
    """Unpickling this calls open(path, "w"): a file appears if and only if someone unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_is_refused_and_never_loaded(server: str, tmp_path: Path) -> None:
    control = tmp_path / "control"
    pickle.loads(
        pickle.dumps(_CreatesFile(control))
    )  # the payload is live: loading it makes a file
    assert control.exists()

    marker = tmp_path / "pwned"
    payload = pickle.dumps({"prompts": ["p"], "images": [], "x": _CreatesFile(marker)})
    for ctype in ("application/octet-stream", "application/python-pickle", "application/json"):
        r = httpx.post(
            f"{server}/v1/rewards/shapes_geneval",
            content=payload,
            headers={**_auth(), "Content-Type": ctype},
        )
        assert r.status_code == 400 and "JSON only" in r.json()["error"]
    assert not marker.exists()


def test_unknown_reward_is_404_and_a_crashing_reward_is_500(server: str) -> None:
    body = {"prompts": ["p"], "images": [_png(Image.new("RGB", (32, 32)))]}
    r = httpx.post(f"{server}/v1/rewards/nope", json=body, headers=_auth())
    assert r.status_code == 404 and "shapes_geneval" in r.json()["error"]
    r = httpx.post(f"{server}/v1/rewards/broken", json=body, headers=_auth())
    assert r.status_code == 500 and "detector crashed" in r.json()["error"]


def test_remote_plugin_gives_the_local_scores(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    prompts, images, metas = _batch(6)
    remote = load_reward(
        "remote", url=server, reward="shapes_geneval", token_env=TOKEN_ENV, batch_size=MAX_BATCH
    )
    local = load_reward("shapes_geneval", partial_credit=True)
    expected = local(prompts, images, metas)
    assert remote(prompts, images, metas) == expected
    assert len(set(expected)) > 1  # blank and drawn images score differently: the check has teeth

    text = load_reward("remote", url=server, reward="words", token_env=TOKEN_ENV)
    reflections = ["<think>the circle is missing</think> add a red circle", "stop"]
    assert text(["p", "p"], images[:2], metas[:2], completions=reflections) == [8.0, 1.0]


def test_remote_plugin_turns_server_errors_into_none(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    prompts, images, metas = _batch(2)
    broken = load_reward(
        "remote", url=server, reward="broken", token_env=TOKEN_ENV, max_retries=1, backoff_s=0.01
    )
    assert broken(prompts, images, metas) == [None, None]
    assert (broken._fn.stats.attempts, broken._fn.stats.failures) == (2, 1)
    monkeypatch.setenv(TOKEN_ENV, "wrong")
    unauthorised = load_reward("remote", url=server, reward="shapes_geneval", token_env=TOKEN_ENV)
    assert unauthorised(prompts, images, metas) == [None, None]
    assert unauthorised._fn.stats.attempts == 1  # a 401 is not retried


def test_serve_rewards_refuses_to_start_without_a_token(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rewards: [{name: shapes_geneval}]\n")
    monkeypatch.delenv("R3RL_REWARD_TOKEN", raising=False)
    proc = run_cli("serve-rewards", str(recipe))
    assert proc.returncode == 2
    assert "set R3RL_REWARD_TOKEN" in proc.stderr
    monkeypatch.setenv("R3RL_REWARD_TOKEN", "t")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewards: [{name: shapes_genevall}]\n")
    proc = run_cli("serve-rewards", str(bad))
    assert proc.returncode == 2 and "did you mean 'shapes_geneval'" in proc.stderr
