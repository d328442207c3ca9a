"""Judge faults against a misbehaving HTTP server started here on 127.0.0.1.

The server's first path segment picks its behaviour (`/500/...`, `/hang/...`, `/close/...`,
`/garbage/...`, ...), so one server plays every failure. Each test checks that calls come back
within the configured bound, that failed samples are `None`, that nothing raises, and that the
counters say what happened.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from r3rl.errors import UserError
from r3rl.judges import HttpPool, worst_case_s
from r3rl.rewards import CombinedReward, load_reward

SLACK_S = 1.0  # scheduling noise on shared CPU cores
P_YES = 0.8


def chat_body(text: str, logprobs: bool) -> dict:
    """An OpenAI chat completion, with vLLM-style top_logprobs on the first token if asked."""
    choice: dict = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
    }
    if logprobs:
        alternatives = [
            {"token": "Yes", "logprob": math.log(P_YES)},
            {"token": " no", "logprob": math.log(1 - P_YES)},
        ]
        choice["logprobs"] = {
            "content": [{"token": "Yes", "logprob": math.log(P_YES), "top_logprobs": alternatives}]
        }
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


class FaultServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self.in_flight: Counter[str] = Counter()  # per mode: hung handlers of earlier tests linger
        self.max_in_flight: Counter[str] = Counter()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FaultServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass

    def do_POST(self) -> None:
        srv = self.server
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = self.path.split("/")[1]
        with srv.lock:
            srv.hits[mode] += 1
            hit = srv.hits[mode]
            srv.auth.append(self.headers.get("Authorization"))
            srv.in_flight[mode] += 1
            srv.max_in_flight[mode] = max(srv.max_in_flight[mode], srv.in_flight[mode])
        try:
            self._answer(mode, hit, payload)
        finally:
            with srv.lock:
                srv.in_flight[mode] -= 1

    def _answer(self, mode: str, hit: int, payload: dict) -> None:
        if mode == "500":
            self._send(500, b'{"error": "boom"}')
        elif mode == "404":
            self._send(404, b'{"error": "no such model"}')
        elif mode == "hang":
            time.sleep(5.0)
            self._send(200, json.dumps(chat_body("Yes", False)).encode())
        elif mode == "close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # no status line at all
        elif mode == "garbage":
            self._send(200, b"\x00\x9f<html>not json")
        elif mode == "notchat":
            self._send(200, b'{"unexpected": true}')
        elif mode == "ramble":
            self._send(
                200, json.dumps(chat_body("I cannot tell from this picture.", False)).encode()
            )
        elif mode == "flaky":  # two 500s, then answers
            ok = hit > 2
            self._send(
                200 if ok else 500, json.dumps(chat_body("Yes", True)).encode() if ok else b"{}"
            )
        elif mode == "slow":  # a healthy but slow judge: 200 ms per answer
            time.sleep(0.2)
            self._send(200, json.dumps(chat_body("Yes", True)).encode())
        elif mode == "scores":  # the reward-server protocol, for the remote plugin
            self._send(200, json.dumps({"scores": [0.25] * len(payload["prompts"])}).encode())
        else:  # "ok": a judge that returns log-probs
            self._send(200, json.dumps(chat_body("Yes", True)).encode())


@pytest.fixture(scope="module")
def server() -> Iterator[FaultServer]:
    srv = FaultServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _reset(server: FaultServer) -> None:
    with server.lock:
        server.hits.clear()
        server.auth.clear()
        server.max_in_flight.clear()


IMAGE = Image.new("RGB", (32, 32), "white")
RECORD = {
    "tag": "single_object",
    "include": [{"class": "circle", "count": 1}],
    "prompt": "a photo of a circle",
}


def judge(server: FaultServer, mode: str | list[str], **args):
    urls = [f"{server.url}/{m}/v1" for m in ([mode] if isinstance(mode, str) else mode)]
    base = urls[0] if len(urls) == 1 else urls
    args = {
        "api_key_env": None,
        "timeout_s": 2.0,
        "max_retries": 2,
        "backoff_s": 0.05,
        "backoff_max_s": 0.2,
        **args,
    }
    return load_reward("vlm_judge", base_url=base, model="judge", **args)


def timed(fn, n: int = 3):
    start = time.perf_counter()
    scores = fn([RECORD["prompt"]] * n, [IMAGE] * n, [RECORD] * n)
    return scores, time.perf_counter() - start


def test_worst_case_bound_by_hand() -> None:
    # 3 attempts of 2 s, backoffs capped at min(0.5, 1) + min(1.0, 1) = 1.5 s
    assert worst_case_s(2.0, 2, 0.5, 1.0) == pytest.approx(7.5)
    # backoff doubling is capped: 0.5 + 1 + 2 + 2 (cap) = 5.5; 5 attempts of 1 s
    assert worst_case_s(1.0, 4, 0.5, 2.0) == pytest.approx(10.5)
    assert worst_case_s(3.0, 0, 0.5, 2.0) == 3.0


def test_logprobs_give_a_graded_yes_probability(server: FaultServer) -> None:
    fn = judge(server, "ok")
    scores, _ = timed(fn)
    assert scores == pytest.approx([P_YES] * 3)
    stats = fn._fn.stats
    assert (stats.requests, stats.attempts, stats.failures, stats.unparseable) == (3, 3, 0, 0)


def test_http_500_is_retried_then_none(server: FaultServer) -> None:
    fn = judge(server, "500")
    scores, elapsed = timed(fn)
    pool: HttpPool = fn._fn.client.pool
    assert scores == [None, None, None]
    assert server.hits["500"] == 9  # 3 requests x (1 + 2 retries)
    assert (pool.stats.requests, pool.stats.attempts, pool.stats.failures) == (3, 9, 3)
    assert elapsed <= pool.worst_case_s + SLACK_S


def test_a_hanging_server_costs_at_most_the_timeout_per_attempt(server: FaultServer) -> None:
    fn = judge(server, "hang", timeout_s=0.4, max_retries=1)
    scores, elapsed = timed(fn)
    pool: HttpPool = fn._fn.client.pool
    assert scores == [None, None, None]
    assert pool.stats.failures == 3 and pool.stats.attempts == 6
    assert 0.8 <= elapsed <= pool.worst_case_s + SLACK_S  # both attempts waited, none waited 5 s


@pytest.mark.parametrize("mode", ["close", "garbage"])
def test_dropped_connections_and_non_json_bodies_are_retried_then_none(
    server: FaultServer, mode: str
) -> None:
    fn = judge(server, mode)
    scores, elapsed = timed(fn)
    pool: HttpPool = fn._fn.client.pool
    assert scores == [None, None, None]
    assert server.hits[mode] == 9 and pool.stats.failures == 3
    assert elapsed <= pool.worst_case_s + SLACK_S


@pytest.mark.parametrize("mode", ["notchat", "ramble"])
def test_unreadable_answers_are_none_counted_and_not_retried(
    server: FaultServer, mode: str
) -> None:
    fn = judge(server, mode)
    scores, _ = timed(fn)
    stats = fn._fn.stats
    assert scores == [None, None, None]
    assert (
        server.hits[mode] == 3
    )  # an answer arrived: asking again at temperature 0 would repeat it
    assert (stats.failures, stats.unparseable) == (0, 3)


def test_client_errors_are_not_retried(server: FaultServer) -> None:
    fn = judge(server, "404")
    scores, _ = timed(fn)
    assert scores == [None, None, None]
    assert server.hits["404"] == 3 and fn._fn.stats.failures == 3


def test_a_transient_outage_is_ridden_out_by_retries(server: FaultServer) -> None:
    fn = judge(server, "flaky", concurrency=1)
    scores, _ = timed(fn, n=1)
    assert scores == pytest.approx([P_YES])
    stats = fn._fn.stats
    assert (stats.attempts, stats.failures) == (3, 0)


def test_load_is_balanced_and_a_failing_endpoint_is_failed_over(server: FaultServer) -> None:
    fn = judge(server, ["ok", "slow"], concurrency=8)
    scores, _ = timed(fn, n=8)
    assert scores == pytest.approx([P_YES] * 8)
    assert fn._fn.client.pool.sent == [4, 4]  # least-busy first, round-robin among ties

    fn = judge(server, ["500", "ok"], max_retries=1, concurrency=4)
    scores, _ = timed(fn, n=4)
    assert scores == pytest.approx([P_YES] * 4)  # every request that met the 500 retried on "ok"
    assert fn._fn.stats.failures == 0


def test_concurrency_cap_holds(server: FaultServer) -> None:
    fn = judge(server, "slow", concurrency=2)
    scores, elapsed = timed(fn, n=6)
    assert scores == pytest.approx([P_YES] * 6)
    assert server.max_in_flight["slow"] == 2
    assert elapsed >= 3 * 0.2  # three waves of two


def test_api_key_comes_from_the_environment(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "s3cret")
    fn = judge(server, "ok", api_key_env="JUDGE_KEY_FOR_TEST")
    timed(fn, n=1)
    assert server.auth == ["Bearer s3cret"]
    monkeypatch.delenv("JUDGE_KEY_FOR_TEST")
    with pytest.raises(UserError, match="JUDGE_KEY_FOR_TEST"):
        judge(server, "ok", api_key_env="JUDGE_KEY_FOR_TEST")


class Spec:
    def __init__(self, name: str, args: dict | None = None) -> None:
        self.name, self.weight, self.args = name, 1.0, args or {}


def test_a_failing_judge_never_raises_out_of_the_training_reward(server: FaultServer) -> None:
    """What a training step calls: the combined reward masks and counts, it does not raise."""
    judge_args = {"model": "judge", "timeout_s": 0.3, "max_retries": 1, "backoff_s": 0.05}
    for mode in ("500", "hang", "close", "garbage", "notchat"):
        reward = CombinedReward(
            [
                Spec("shapes_geneval"),
                Spec("vlm_judge", {"base_url": f"{server.url}/{mode}/v1", **judge_args}),
            ]
        )
        result = reward([RECORD["prompt"]] * 2, [IMAGE] * 2, [RECORD] * 2)
        assert result.total == [None, None], mode
        assert result.failures == {"shapes_geneval": 0, "vlm_judge": 2}, mode
        assert result.latency_s["vlm_judge"] <= reward.fns[1]._fn.client.pool.worst_case_s + SLACK_S


def test_remote_reward_follows_the_same_rules(server: FaultServer) -> None:
    """`remote` (calls `r3rl serve-rewards`) splits batches and fails to None like the judge."""
    ok = load_reward("remote", url=f"{server.url}/scores", reward="r", token_env=None, batch_size=2)
    assert ok(["a"] * 5, [IMAGE] * 5, [{}] * 5) == [0.25] * 5
    assert server.hits["scores"] == 3  # 2 + 2 + 1
    bad = load_reward(
        "remote",
        url=f"{server.url}/500",
        reward="r",
        token_env=None,
        timeout_s=0.5,
        max_retries=1,
        backoff_s=0.05,
    )
    start = time.perf_counter()
    assert bad(["a"] * 3, [IMAGE] * 3, [{}] * 3) == [None] * 3
    assert time.perf_counter() - start <= bad._fn.pool.worst_case_s + SLACK_S
    assert bad._fn.stats.failures == 1


def test_metadata_that_is_not_json_is_a_user_error(server: FaultServer) -> None:
    fn = load_reward("remote", url=f"{server.url}/scores", reward="r", token_env=None)
    with pytest.raises(UserError, match="not JSON"):
        fn(["a"], [IMAGE], [{"include": {"circle"}}])  # a set: a recipe/prompt-file mistake
    assert server.hits["scores"] == 0
