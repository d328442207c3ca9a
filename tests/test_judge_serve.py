"""The judge client and `vlm_judge` against a real OpenAI-compatible server: `transformers serve`.

The test builds a tiny OLMo-2 language model with a locally trained tokenizer, teaches it in
a few seconds to answer the three kinds of judge prompts (yes/no per constraint, "Final Score",
JSON), saves it, and serves it on 127.0.0.1. `transformers serve` drops image parts for a text
model and ignores `logprobs`, so this exercises the text paths end to end; the log-prob path
is covered against a stand-in server in test_judge_faults.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, wait_healthy
from PIL import Image

from r3rl.rewards import load_reward
from rewards.vlm_judge import JSON_PROMPT, SCORE_PROMPT, YES_NO_PROMPT

CIRCLE = {"include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
SQUARE = {"include": [{"class": "square", "count": 1}], "prompt": "a photo of a square"}


def _lessons() -> list[tuple[str, str]]:
    """(user text, answer): what the tiny judge must say to each prompt the reward sends."""
    return [
        (YES_NO_PROMPT.format(question="Is there a circle in the image?"), "yes"),
        (YES_NO_PROMPT.format(question="Is there a square in the image?"), "no"),
        (
            SCORE_PROMPT.format(prompt=CIRCLE["prompt"], low=1, high=10),
            "it is clear. final score: 7",
        ),
        (
            JSON_PROMPT.format(prompt=CIRCLE["prompt"], low=1, high=10),
            '{"score": 8, "reason": "clear"}',
        ),
    ]


def build_tiny_judge(path: Path) -> None:
    """Train a 2-layer OLMo-2 on the lessons (answer tokens only) and save it with its tokenizer."""
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from r3rl.models.tokenizer import train_chat_tokenizer

    torch.manual_seed(0)
    lessons = _lessons()
    tok = train_chat_tokenizer([t for pair in lessons for t in pair])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for text, answer in lessons:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"] + [eos]
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    cfg = Olmo2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    model = Olmo2ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    answer = labels[:, 1:] != -100
    for _ in range(300):  # until greedy decoding repeats every answer token with a margin
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        probs = out.logits[:, :-1].softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1))
        if bool((probs.squeeze(-1)[answer] > 0.9).all()):
            break
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[tuple[str, str]]:
    """(base_url, model) of `transformers serve` running the tiny judge; stopped afterwards."""
    path = tmp_path_factory.mktemp("judge") / "tiny-judge"
    build_tiny_judge(path)
    port = free_port()
    cli = Path(sys.executable).with_name("transformers")
    log = (path.parent / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            str(cli),
            "serve",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, timeout_s=120, what="transformers serve",
                     log=lambda: (path.parent / "serve.log").read_text()[-2000:])
        yield f"{base}/v1", str(path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


IMAGE = Image.new("RGB", (32, 32), "white")


def judge(served: tuple[str, str], **args):
    base_url, model = served
    return load_reward(
        "vlm_judge",
        base_url=base_url,
        model=model,
        api_key_env=None,
        timeout_s=30.0,
        max_retries=1,
        **args,
    )


def test_yes_no_questions_from_metadata(served: tuple[str, str]) -> None:
    fn = judge(served)
    scores = fn([CIRCLE["prompt"], SQUARE["prompt"]], [IMAGE, IMAGE], [CIRCLE, SQUARE])
    assert scores == [1.0, 0.0]  # text fallback: this server returns no log-probs
    stats = fn._fn.stats
    assert (stats.requests, stats.attempts, stats.failures, stats.unparseable) == (2, 2, 0, 0)


def test_pointwise_score_and_json_modes(served: tuple[str, str]) -> None:
    assert judge(served, mode="score")([CIRCLE["prompt"]], [IMAGE], [CIRCLE]) == pytest.approx(
        [6 / 9]
    )
    assert judge(served, mode="json")([CIRCLE["prompt"]], [IMAGE], [CIRCLE]) == pytest.approx(
        [7 / 9]
    )


def test_a_request_the_server_refuses_is_none_not_retried(served: tuple[str, str]) -> None:
    base_url, _ = served
    fn = judge((base_url, "some-other-model"))  # the server is pinned to its model: HTTP 400
    assert fn([CIRCLE["prompt"]], [IMAGE], [CIRCLE]) == [None]
    stats = fn._fn.stats
    assert (stats.attempts, stats.failures) == (1, 1)
