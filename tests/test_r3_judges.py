"""R3's judges as vlm_judge modes (issue 17 item 11), tested against R3's own code.

tests/fixtures/r3/r3_reference/ holds sen-ye/R3's `train/reward_func.py` and `train/llm_server.py`
verbatim (commit e9912ac5). Both R3's reward functions (through its GeneralLLMServer and the
OpenAI client) and r3rl's `vlm_judge` post to one local chat server on 127.0.0.1 that records each
request body and answers with a canned text; the requests must be equal, and so must the scores
wherever R3 could read the answer (where it could not, R3 scores 0 and r3rl None).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r3rl.data import load_prompts
from r3rl.judges import checklist, r3_texts
from rewards.vlm_judge import VLMJudge

R3 = Path(__file__).parent / "fixtures" / "r3"
sys.path.insert(0, str(R3))
ref = pytest.importorskip("r3_reference.reward_func")  # needs torch, requests and openai, as R3 does

GENEVAL_PP = load_prompts(R3 / "test_geneval++.jsonl")
TIIF = load_prompts(R3 / "test_TIIF.jsonl", prompt_field="short_description", tag_field="type")
TIIF_TRAIN = load_prompts(R3 / "train_TIIF_head.jsonl", prompt_field="short_description")
MODEL = "Qwen2.5-VL-72B-Instruct-AWQ"


class ChatServer:
    """An OpenAI-compatible /v1/chat/completions that records bodies and answers `self.reply`."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.reply = ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.bodies.append(body)
                answer = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": MODEL,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": outer.reply}}],
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server() -> Iterator[ChatServer]:
    s = ChatServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def _reference(mode: str, url: str):
    """R3's reward function for `mode`, as online_rl.py builds it (eval judges without client_type)."""
    return {
        "r3_geneval_plus": lambda: ref.geneval_plus_train_reward(url=url, model_name=MODEL),
        "r3_geneval_plus_eval": lambda: ref.geneval_plus_eval_reward(url=url, model_name=MODEL),
        "r3_vqa": lambda: ref.vqa_reward_fn(url=url, model_name=MODEL),
        "r3_tiif": lambda: ref.tiif_reward_fn(url=url, model_name=MODEL),
    }[mode]()


def _ref_score(mode: str, out) -> float:
    return float(out[0]) if isinstance(out, tuple) else float(out)


def _both(server: ChatServer, mode: str, record: dict, image: Image.Image, reply: str, **kw):
    """(R3's score, r3rl's score, R3's request body, r3rl's request body) for one record and answer."""
    server.reply = reply
    n = len(server.bodies)
    theirs = _ref_score(mode, _reference(mode, server.url)(image, record["prompt"], record))
    judge = VLMJudge(server.url, MODEL, mode=mode, max_retries=0, **kw)
    ours = asyncio.run(judge([record["prompt"]], [image], [record]))[0]
    assert len(server.bodies) == n + 2
    return theirs, ours, json.loads(server.bodies[n]), json.loads(server.bodies[n + 1])


def test_checklist_is_r3s_for_every_geneval_record() -> None:
    for record in GENEVAL_PP + load_prompts(Path(__file__).parent / "fixtures" / "prompts_valid.jsonl"):
        assert checklist(record) == ref.metadata_to_explanation(record)


def test_texts_are_r3s_for_every_record() -> None:
    for r in GENEVAL_PP:
        system, text = r3_texts("r3_geneval_plus", r["prompt"], r)
        assert system == ref.GENEVAL_TRAIN_SYSTEM_PROMPT
        assert text == f"Instruction: {r['prompt'].strip()}\n\nExplanation: {ref.metadata_to_explanation(r)}"
        system, text = r3_texts("r3_geneval_plus_eval", r["prompt"], r)
        assert system == ref.GENEVAL_PLUS_RAW_SYSTEM_PROMPT
        assert text == (f"Instruction:\n{r['prompt'].strip()}\n\nExplanation checklist:\n"
                        f"{ref.metadata_to_explanation(r)}")
    for r in TIIF + TIIF_TRAIN:
        qs = r["yn_question_list"]
        assert r3_texts("r3_tiif", r["prompt"], r) == (None, ref.format_questions_prompt(ref.TIIF_EVAL_SYSTEM_PROMPT, qs))
        numbered = "\n".join(f"Q{i + 1}: {q}" for i, q in enumerate(qs))  # vqa_reward_fn's own lines
        assert r3_texts("r3_vqa", r["prompt"], r) == (None, ref.YN_SYSTEM_PROMPT_QWEN.replace("##YNQuestions##", numbered))


@pytest.mark.parametrize(
    "mode, record",
    [
        ("r3_geneval_plus", GENEVAL_PP[0]),
        ("r3_geneval_plus", GENEVAL_PP[40]),  # region
        ("r3_geneval_plus", next(r for r in GENEVAL_PP if r["tag"] == "size_spatial_attr")),
        ("r3_geneval_plus", next(r for r in GENEVAL_PP if "exclude" in r)),
        ("r3_geneval_plus_eval", GENEVAL_PP[200]),
        ("r3_vqa", TIIF_TRAIN[0]),
        ("r3_vqa", next(r for r in TIIF if "no" in r["yn_answer_list"])),
        ("r3_tiif", TIIF[0]),
        ("r3_tiif", next(r for r in TIIF if "Yes" in r["yn_answer_list"])),
    ],
)
def test_request_is_r3s_byte_for_byte(server: ChatServer, image: Image.Image, mode: str, record: dict) -> None:
    _, _, theirs, ours = _both(server, mode, record, image, "{}")
    # the messages as serialised: same keys, order, texts and image bytes (JPEG data URL)
    assert json.dumps(ours["messages"]) == json.dumps(theirs["messages"])
    assert ours == theirs  # and the sampling settings: model, temperature 0, top_p 0.9, max_tokens 4096


GENEVAL_ANSWERS = [
    ('{"correct": 1}', 1.0, 1.0),
    ('```json\n{"correct": 0, "reason": "two cows, not three"}\n```', 0.0, 0.0),
    ('The image is right.\n{\n  "correct": 1\n}', 1.0, 1.0),
    ('{"correct": 1,}', 0.0, None),  # R3's own format example has this comma: a JSON error, R3 scores 0
    ("It looks correct.", 0.0, None),  # no JSON: R3's fallback {"correct": 0}
    ('{"reason": "fine"}', 0.0, None),  # no verdict: R3's .get('correct', 0)
]


@pytest.mark.parametrize("mode", ["r3_geneval_plus", "r3_geneval_plus_eval"])
@pytest.mark.parametrize("reply, r3_score, score", GENEVAL_ANSWERS)
def test_geneval_plus_scores(server, image, mode, reply, r3_score, score) -> None:
    theirs, ours, _, _ = _both(server, mode, GENEVAL_PP[40], image, reply)
    assert (theirs, ours) == (r3_score, score)


def test_vqa_scores(server, image) -> None:
    record = {"prompt": "p", "yn_question_list": ["Is there a cat?  ", "Is it red?", "Is there a dog?"],
              "yn_answer_list": ["yes", "Yes", "no"]}
    for reply, r3_score, score in [
        ('{"Q1": "yes", "Q2": "yes", "Q3": "no"}', 1.0, 1.0),
        ('{"Q1": "Yes", "Q2": "no", "Q3": "no"}', 0.67, 0.67),  # R3 rounds to 2 decimals
        ('```json\n{"Q1": "no", "Q2": "no", "Q3": "yes",}\n```', 0.0, None),  # trailing comma
        ('{"Q1": "yes"}', 1.0, None),  # R3 divides by the answers given: 1 of 3 questions scores 1.0
        ("yes yes no", 0.0, None),
    ]:
        theirs, ours, _, _ = _both(server, "r3_vqa", record, image, reply)
        assert (theirs, ours) == (r3_score, score), reply


def test_tiif_scores(server, image) -> None:
    record = {"prompt": "p", "yn_question_list": ["Is there a cat?", "Is it red?", "Is there a dog?"],
              "yn_answer_list": ["yes", "Yes", "no"]}
    replies = [
        ("yes, a cat sits there\nYes\nno, none", 2 / 3, 1.0),  # R3: "yes" != "Yes" as written
        ("Yes.\nNo\nno", 2 / 3, 2 / 3),  # the judge says no to the "Yes": both 2/3
        ("Answers:\nyes\nyes\nno", 2 / 3, 1.0),  # lines without an answer are skipped
        ("yes\nyes", 0.0, None),  # two answers to three questions: R3 raises and scores 0
    ]
    for reply, r3_score, score in replies:
        theirs, ours, _, _ = _both(server, "r3_tiif", record, image, reply)
        assert theirs == pytest.approx(r3_score) and (ours == pytest.approx(score) if score is not None else ours is None)
        _, exact, _, _ = _both(server, "r3_tiif", record, image, reply, exact_case=True)
        assert exact == (None if score is None else pytest.approx(r3_score)), reply  # R3's compare


def test_unreadable_answers_are_counted(server, image) -> None:
    server.reply = "no idea"
    judge = VLMJudge(server.url, MODEL, mode="r3_geneval_plus", max_retries=0)
    assert asyncio.run(judge(["a", "b"], [image, image], [GENEVAL_PP[0], GENEVAL_PP[1]])) == [None, None]
    assert judge.stats.unparseable == 2
