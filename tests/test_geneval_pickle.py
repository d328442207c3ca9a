"""The `geneval` reward's opt-in client for the stock GenEval detector server (issue 17 item 12).

The server here speaks yifan123/reward-server's `app_geneval.py` protocol (the one flow_grpo's and
R3's `geneval_score` call): POST / with a pickled {"images": [JPEG bytes], "meta_datas",
"only_strict"}, answered 200 with a pickled {"scores", "rewards", "strict_rewards", "group_rewards",
"group_strict_rewards"} or 500 with a traceback. Its detector is replaced by a rule on the
records, so the test needs no model. It is started on 127.0.0.1 by the test. R3's own client
(tests/fixtures/r3/r3_reference/reward_func.py, verbatim) talks to the same server: its request
must equal ours and its scores ours.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
import threading
import traceback
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r3rl.errors import UserError
from rewards.geneval import GenEval

R3 = Path(__file__).parent / "fixtures" / "r3"


def fake_geneval(images, meta_datas, only_strict):
    """compute_geneval's return shape: partial score, correct (0 when only_strict), strict, per-tag."""
    scores, rewards, strict = [], [], []
    groups, strict_groups = defaultdict(list), defaultdict(list)
    for image, meta in zip(images, meta_datas):
        frac = round(float(np.asarray(image)[..., 0].mean()) / 255, 1)  # red level stands for detections
        scores.append(frac)
        strict.append(1.0 if frac >= 0.9 else 0.0)
        rewards.append(0.0 if only_strict else (1.0 if frac >= 0.5 else 0.0))
        strict_groups[meta["tag"]].append(strict[-1])
        groups[meta["tag"]].append(rewards[-1])
    return scores, rewards, strict, dict(groups), dict(strict_groups)


class PickleServer:
    """app_geneval.py's `inference` route on http.server; `fail` answers 500 or garbage."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail: str | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    if outer.fail == "500":
                        raise RuntimeError("detector crashed")
                    data = pickle.loads(data)  # the stock server's own protocol
                    outer.requests.append(data)
                    images = [Image.open(BytesIO(d), formats=["jpeg"]) for d in data["images"]]
                    out = fake_geneval(images, data["meta_datas"], data["only_strict"])
                    keys = ("scores", "rewards", "strict_rewards", "group_rewards", "group_strict_rewards")
                    response = pickle.dumps(dict(zip(keys, out)))
                    if outer.fail == "garbage":
                        response = b"<html>proxy error</html>"
                    code = 200
                except Exception:  # noqa: BLE001 - as app_geneval.py: the traceback, status 500
                    response, code = traceback.format_exc().encode("utf-8"), 500
                self.send_response(code)
                self.send_header("Content-Length", str(len(response)))
                self.end_headers()
                self.wfile.write(response)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[PickleServer]:
    s = PickleServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


RECORDS = [
    {"tag": "single_object", "include": [{"class": "bowl", "count": 1}], "prompt": "a photo of a bowl"},
    {"tag": "counting", "include": [{"class": "stop sign", "count": 4}], "exclude": [{"class": "stop sign", "count": 5}],
     "prompt": "a photo of four stop signs"},
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
]


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), (r, 40, 90)) for r in (255, 128, 30)]


def _score(reward: GenEval, images=None, records=RECORDS) -> list[float | None]:
    images = images or _images()
    metas = [{k: v for k, v in r.items() if k != "prompt"} for r in records]
    return asyncio.run(reward([r["prompt"] for r in records], images, metas))


def test_pickle_is_refused_without_the_flag() -> None:
    for args in ({}, {"allow_pickle": False}, {"allow_pickle": "yes"}):
        with pytest.raises(UserError, match="protocol=pickle needs allow_pickle: true"):
            GenEval("http://127.0.0.1:1/", protocol="pickle", **args)
    with pytest.raises(UserError, match="protocol='pickles' is invalid"):
        GenEval("http://127.0.0.1:1/", protocol="pickles")
    with pytest.raises(UserError, match="score_field='reward' is invalid"):
        GenEval("http://127.0.0.1:1/", protocol="pickle", allow_pickle=True, score_field="reward")


@pytest.mark.parametrize(
    "args, only_strict, expected",
    [
        ({}, True, [1.0, 0.5, 0.1]),  # scores: flow_grpo's training request and R3's training reward
        ({"partial_credit": False}, True, [1.0, 0.0, 0.0]),  # strict_rewards
        ({"score_field": "rewards"}, False, [1.0, 1.0, 0.0]),  # GenEval's correct (R3's eval reward)
    ],
)
def test_scores_from_the_stock_protocol(server: PickleServer, args: dict, only_strict: bool, expected: list) -> None:
    reward = GenEval(server.url, protocol="pickle", allow_pickle=True, **args)
    assert _score(reward) == expected
    (request,) = server.requests
    assert request["only_strict"] is only_strict
    assert request["meta_datas"] == RECORDS


def test_request_and_scores_equal_r3s_client(server: PickleServer) -> None:
    sys.path.insert(0, str(R3))
    ref = pytest.importorskip("r3_reference.reward_func")
    images = _images()
    arrays = np.stack([np.asarray(im) for im in images])  # R3 passes NHWC uint8 (or a tensor)
    scores, rewards, strict, *_ = ref.geneval_score(server.url)(arrays, None, RECORDS, only_strict=False)
    for field, theirs in (("scores", scores), ("rewards", rewards), ("strict_rewards", strict)):
        ours = GenEval(server.url, protocol="pickle", allow_pickle=True, score_field=field)
        assert _score(ours, images) == theirs
    r3_request, *our_requests = server.requests
    assert our_requests[1] == r3_request  # the `rewards` request: only_strict false, as R3 sent it
    assert our_requests[1]["images"] == r3_request["images"]  # the same JPEG bytes


def test_batches_and_failures_are_none_and_counted(server: PickleServer) -> None:
    reward = GenEval(server.url, protocol="pickle", allow_pickle=True, batch_size=2, max_retries=1)
    assert _score(reward) == [1.0, 0.5, 0.1]
    # two batches of at most 2, sent concurrently: they may arrive in either order
    assert sorted(len(r["images"]) for r in server.requests) == [1, 2]
    for fail in ("500", "garbage"):
        server.fail = fail
        reward = GenEval(server.url, protocol="pickle", allow_pickle=True, max_retries=1, timeout_s=5)
        reward.pool.backoff_s = 0.0
        assert _score(reward) == [None, None, None]
        assert reward.stats.failures == 1 and reward.stats.attempts == 2


def test_json_protocol_unchanged_and_never_unpickles(server: PickleServer) -> None:
    """The default client posts JSON; a pickled answer is unreadable to it, not unpickled."""
    reward = GenEval(server.url, max_retries=0)
    assert _score(reward) == [None, None, None]
    assert server.requests == []  # the stock server cannot read JSON (500), nothing was unpickled
    assert reward.stats.failures == 1
