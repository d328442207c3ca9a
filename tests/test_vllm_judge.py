"""`vlm_judge` against a REAL vLLM server on 127.0.0.1 (vLLM's CPU build, from .venv-vllm).

The server holds a tiny random-weight Idefics3 (conftest.build_tiny_vllm_vlm) and gets the
images as base64 PNGs, as a real judge does. A random model writes garbage, so these tests show
what guided decoding guarantees: every answer parses, every sample gets a score on the scale,
and a sample is `None` (masked, counted) only when its server is down. They fail (not skip)
when the vLLM env is missing; R3RL_SKIP_VLLM=1 skips them (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time

import pytest
import torch
from conftest import start_vllm
from PIL import Image

from r3rl.algos.advantages import group_advantages
from r3rl.judges import geneval_questions, user_message
from r3rl.rewards import CombinedReward, load_reward
from rewards.vlm_judge import JSON_PROMPT, SCORE_PROMPT, YES_NO_PROMPT, VLMJudge

pytestmark = pytest.mark.vllm

COLOURS = ["red", "blue", "green", "white", "black", "yellow"]
IMAGES = [Image.new("RGB", (32, 32), c) for c in COLOURS]
CIRCLE = {"include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
RED_SQUARES = {
    "include": [{"class": "square", "count": 2, "color": "red"}],
    "exclude": [{"class": "square", "count": 3}],
    "prompt": "a photo of two red squares",
}
RECORDS = [CIRCLE, RED_SQUARES] * 3
PROMPTS = [r["prompt"] for r in RECORDS]


def judge(server, **args) -> VLMJudge:
    defaults = {"base_url": server.base_url if server is not None else None, "model": "tiny-judge",
                "timeout_s": 60.0, "max_retries": 1, "backoff_s": 0.05}  # fmt: skip
    return load_reward("vlm_judge", **(defaults | args))


def raw(judge_fn, text: str, image: Image.Image, **kwargs):
    """One chat answer from the judge's own client (what the reward sends, read back whole)."""
    inner: VLMJudge = judge_fn._fn
    url = inner._urls([image])[0]
    return asyncio.run(inner.client.ask_many([[user_message(text, [url])]], **kwargs))[0]


def test_yes_no_is_p_yes_from_top_logprobs_under_guided_choice(vllm_judge_server) -> None:
    fn = judge(vllm_judge_server, mode="yes_no")
    scores = fn(PROMPTS, IMAGES, RECORDS)
    stats = fn._fn.stats
    assert fn._fn._vllm is True  # guided: auto found vLLM through GET /models
    assert stats.failures == stats.unparseable == 0
    # graded probabilities (not the text fallback's 0/1), each sample its own
    assert all(isinstance(s, float) and 0.0 < s < 1.0 for s in scores), scores
    assert len({round(s, 6) for s in scores}) > 1
    # one request per question: CIRCLE asks one, RED_SQUARES an include and an exclusion
    assert stats.requests == sum(len(geneval_questions(r)) for r in RECORDS) == 3 * (1 + 2)
    # deterministic at temperature 0: the same images score the same
    assert fn(PROMPTS, IMAGES, RECORDS) == pytest.approx(scores, abs=1e-5)

    # what the score rests on: under guided choice the first position's top_logprobs are the
    # masked distribution (vLLM applies the grammar before computing log-probs), so its mass is
    # all on prefixes of yes/no and P(yes) is read off it exactly
    question = YES_NO_PROMPT.format(question="Is there a circle in the image?")
    answer = raw(fn, question, IMAGES[0], max_tokens=4, top_logprobs=20,
                 structured=fn._fn.structured(True))  # fmt: skip
    assert answer.text in ("yes", "no")
    first = answer.top_logprobs[0]
    allowed = [(t, lp) for t, lp in first if math.exp(lp) > 1e-6]
    assert sum(math.exp(lp) for _, lp in allowed) == pytest.approx(1.0, abs=1e-3)
    assert all("yes".startswith(t.lower()) or "no".startswith(t.lower()) for t, _ in allowed)
    p_yes = sum(math.exp(lp) for t, lp in allowed if "yes".startswith(t.lower()))
    assert scores[0] == pytest.approx(p_yes, abs=1e-4)  # CIRCLE asks exactly this question


def test_unguided_answers_of_a_random_model_are_none_and_counted(vllm_judge_server) -> None:
    """Without guided decoding the tiny model's free text rarely answers: the issue's all-None
    `score` mode. Whatever it writes, a None is always counted, never a silent 0."""
    fn = judge(vllm_judge_server, mode="score", guided=False)
    scores = fn(PROMPTS, IMAGES, RECORDS)
    stats = fn._fn.stats
    assert stats.failures == 0
    assert sum(s is None for s in scores) == stats.unparseable
    assert all(s is None or 0.0 <= s <= 1.0 for s in scores)


@pytest.mark.parametrize("max_tokens", [20, 256])
def test_score_mode_always_reads_a_final_score_within_max_tokens(vllm_judge_server, max_tokens) -> None:
    fn = judge(vllm_judge_server, mode="score", min_score=1, max_score=10, max_tokens=max_tokens)
    scores = fn(PROMPTS, IMAGES, RECORDS)
    assert fn._fn.stats.failures == fn._fn.stats.unparseable == 0
    assert all(s is not None and 0.0 <= s <= 1.0 for s in scores), scores
    assert all(abs(s * 9 - round(s * 9)) < 1e-9 for s in scores)  # one of the 10 integer steps
    text = SCORE_PROMPT.format(prompt=CIRCLE["prompt"], low=1, high=10)
    answer = raw(fn, text, IMAGES[1], max_tokens=max_tokens, structured=fn._fn.structured(True))
    assert re.fullmatch(r"[ -~\n]*\n[Ff]inal [Ss]core: (10|[1-9])", answer.text), answer.text
    assert len(answer.text) - len("\nfinal score: 10") <= fn._fn.reason_chars


@pytest.mark.parametrize("max_tokens", [40, 256])
def test_json_mode_answers_bounded_json_that_fits_max_tokens(vllm_judge_server, max_tokens) -> None:
    fn = judge(vllm_judge_server, mode="json", min_score=1, max_score=5, max_tokens=max_tokens)
    scores = fn(PROMPTS, IMAGES, RECORDS)
    assert fn._fn.stats.failures == fn._fn.stats.unparseable == 0
    assert all(s is not None and 0.0 <= s <= 1.0 for s in scores), scores
    text = JSON_PROMPT.format(prompt=CIRCLE["prompt"], low=1, high=5)
    answer = raw(fn, text, IMAGES[2], max_tokens=max_tokens, structured=fn._fn.structured(True))
    rating = json.loads(answer.text)  # complete JSON: never cut off by max_tokens
    assert rating["score"] in (1, 2, 3, 4, 5)
    assert len(rating["reason"]) <= fn._fn.reason_chars


def test_json_schema_sent_without_guided_decoding_is_bounded() -> None:
    """The issue's json-mode bug: the schema bounded neither the score (a judge wrote 5196) nor
    the reason (2000 characters for 256 tokens). Servers without guided decoding get this."""
    inner = VLMJudge("http://127.0.0.1:9/v1", "m", mode="json", min_score=1, max_score=10,
                     max_tokens=256, guided=False)  # fmt: skip
    schema = inner.schema()
    assert schema["properties"]["score"] | {} == {"type": "number", "minimum": 1.0, "maximum": 10.0}
    assert schema["properties"]["reason"]["maxLength"] == inner.reason_chars < 256 - 20
    assert inner.structured(False) is None


@pytest.fixture(scope="module")
def second_server(vllm_judge_model):
    """Another server with the same weights: a replica to balance over, and to kill."""
    server = start_vllm(vllm_judge_model, "tiny-judge", vllm_judge_model.parent / "server-b.log")
    try:
        yield server
    finally:
        server.stop()


def test_two_servers_share_the_load_and_agree(vllm_judge_server, second_server) -> None:
    one = judge(vllm_judge_server, mode="json")(PROMPTS, IMAGES, RECORDS)
    fn = judge(None, base_url=[vllm_judge_server.base_url, second_server.base_url],
               mode="json", concurrency=4)  # fmt: skip
    both = fn(PROMPTS, IMAGES, RECORDS)
    pool = fn._fn.client.pool
    assert min(pool.sent) >= 2 and sum(pool.sent) == len(PROMPTS), pool.sent
    assert both == pytest.approx(one)  # same weights, greedy: same scores from either replica
    assert fn._fn.stats.failures == fn._fn.stats.unparseable == 0


def _kill_after(server, fn, requests: int) -> threading.Thread:
    """Kill `server` (SIGKILL, as a crash) once `fn`'s judge has sent `requests` requests."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while fn._fn.stats.requests < requests and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_server_killed_mid_run_gives_none_masked_counted_and_the_run_goes_on(
    vllm_judge_server, second_server
) -> None:
    n = 24
    prompts, images, records = [CIRCLE["prompt"]] * n, [IMAGES[i % 6] for i in range(n)], [CIRCLE] * n
    # two replicas, one dies mid-run: its requests fail over to the other, every sample scored
    fn = judge(None, base_url=[second_server.base_url, vllm_judge_server.base_url], mode="yes_no",
               concurrency=2, timeout_s=20.0)  # fmt: skip
    watcher = _kill_after(second_server, fn, requests=6)
    scores = fn(prompts, images, records)
    watcher.join()
    assert second_server.proc.poll() is not None  # really dead
    assert all(isinstance(s, float) and 0 < s < 1 for s in scores), scores
    stats = fn._fn.stats
    assert stats.failures == 0 and stats.attempts > stats.requests  # failed attempts were retried

    # the only server is dead: None for every sample, counted, within the retry bound
    lone = judge(second_server, mode="yes_no", timeout_s=5.0)
    start = time.perf_counter()
    assert lone(prompts[:4], images[:4], records[:4]) == [None] * 4
    assert time.perf_counter() - start <= lone._fn.client.pool.worst_case_s + 2.0
    assert lone._fn.stats.failures == 4

    # what a training step sees: the combined reward masks those samples (None total, counted
    # in judge failures) and the group advantage skips them; the scored ones still train
    class Spec:
        def __init__(self, base_url: list[str]) -> None:
            self.name, self.weight = "vlm_judge", 1.0
            self.args = {"base_url": base_url, "model": "tiny-judge", "mode": "yes_no",
                         "timeout_s": 5.0, "max_retries": 0}  # fmt: skip

    alive, dead = vllm_judge_server.base_url, second_server.base_url
    live = CombinedReward([Spec([alive])])(prompts[:4], images[:4], records[:4])
    gone = CombinedReward([Spec([dead])])(prompts[:4], images[:4], records[:4])
    assert all(s is not None for s in live.total) and live.failures == {"vlm_judge": 0}
    assert gone.total == [None] * 4 and gone.failures == {"vlm_judge": 4}
    rewards = torch.tensor([*live.total[:2], math.nan, math.nan])  # a group, half unscored
    adv, valid, _, _ = group_advantages(rewards, [0, 0, 0, 0])
    assert valid.tolist() == [True, True, False, False]
    assert adv[2:].tolist() == [0.0, 0.0]
    assert adv[:2].sum().item() == pytest.approx(0.0, abs=1e-6)


def test_constrained_p_yes_counts_every_spelling_by_hand() -> None:
    """Under a yes/no choice the first token may be 'y' (then 'es'): its mass is yes's too.
    Free text counts whole words only ('n' could start "nothing")."""
    from r3rl.judges import yes_probability

    first = [("yes", math.log(0.3)), ("y", math.log(0.1)), ("No", math.log(0.2)), ("n", math.log(0.4))]
    assert yes_probability([first], constrained=True) == pytest.approx(0.4)
    assert yes_probability([first]) == pytest.approx(0.3 / 0.5)
    assert yes_probability([[("the", 0.0)], first], constrained=True) is None  # first position decides
