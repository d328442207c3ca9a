"""vlm_judge: score images with a vision-language model served behind an OpenAI-compatible API.

Serve the judge with `vllm serve` (see launch/vllm_judge.sh) and point a recipe at it:

    rewards:
      - name: vlm_judge
        args: {base_url: http://judge-node:8000/v1, model: Qwen/Qwen2.5-VL-72B-Instruct-AWQ,
               mode: yes_no, api_key_env: JUDGE_API_KEY, timeout_s: 60, max_retries: 3}

Modes:
- `yes_no` (default): one yes/no question per constraint of the prompt record (GenEval
  metadata, or free-form `questions` in the prompt file); the score is the mean over
  questions of P(expected answer), from log-probs when the server returns them, else from
  the text (0 or 1).
- `score`: pointwise quality in the style of UnifiedReward: one score in
  [min_score, max_score] read after "Final Score:", scaled to [0, 1].
- `json`: the same score as a JSON object validated against a schema (vLLM can enforce it).

A sample whose answers cannot be had or read scores `None`; `stats` counts why.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image
from pydantic import BaseModel, Field

from r3rl.errors import UserError
from r3rl.judges import (
    ChatClient,
    HttpPool,
    JudgeStats,
    geneval_questions,
    image_data_url,
    parse_json,
    parse_score,
    user_message,
    yes_score,
)

MODES = ("yes_no", "score", "json")
DEFAULT_MAX_TOKENS = {"yes_no": 4, "score": 256, "json": 256}

YES_NO_PROMPT = "{question} Answer with yes or no."
SCORE_PROMPT = (
    "Here is a text caption and an image generated from it. Judge the image on two things: "
    "(1) how faithfully it shows the caption: objects, counts, colours, attributes and "
    "spatial relations; (2) its visual quality: clarity, detail, colour and composition.\n"
    'Caption: "{prompt}"\n'
    "Explain briefly, then give one overall score from {low} to {high} (higher is better) "
    "on the last line as 'Final Score: N'."
)
JSON_PROMPT = (
    "Here is a text caption and an image generated from it. Judge how faithfully the image "
    "shows the caption (objects, counts, colours, attributes, spatial relations) and its "
    'visual quality.\nCaption: "{prompt}"\n'
    'Answer with only a JSON object: {{"score": <number from {low} to {high}>, '
    '"reason": "<one sentence>"}}.'
)


class Rating(BaseModel):
    """The JSON answer of `json` mode."""

    score: float
    reason: str = Field("", max_length=2000)


class VLMJudge:
    """The reward; `base_url` may be a list of equivalent servers (load-balanced, failed over)."""

    def __init__(
        self,
        base_url: str | list[str],
        model: str,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        mode: str = "yes_no",
        concurrency: int = 32,
        min_score: float = 1.0,
        max_score: float = 10.0,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_logprobs: int = 20,
        image_format: str = "png",
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
    ) -> None:
        if mode not in MODES:
            raise UserError(
                f"vlm_judge mode={mode!r} is invalid: expected one of {', '.join(MODES)}"
            )
        if not max_score > min_score:
            raise UserError(f"vlm_judge needs max_score > min_score; got {min_score}, {max_score}")
        pool = HttpPool(
            base_url,
            api_key_env=api_key_env,
            timeout_s=timeout_s,
            max_retries=max_retries,
            concurrency=concurrency,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
        )
        self.client = ChatClient(pool, model, temperature=temperature)
        self.mode = mode
        self.low, self.high = float(min_score), float(max_score)
        self.max_tokens = max_tokens or DEFAULT_MAX_TOKENS[mode]
        self.top_logprobs = top_logprobs
        self.image_format = image_format

    @property
    def stats(self) -> JudgeStats:
        return self.client.pool.stats

    def _urls(self, images: Sequence[Image.Image]) -> list[str]:
        return [image_data_url(im, self.image_format) for im in images]

    async def _yes_no(
        self, images: Sequence[Image.Image], metadata: Sequence[dict]
    ) -> list[float | None]:
        questions = [geneval_questions(m) for m in metadata]
        flat = [(i, q) for i, qs in enumerate(questions) for q in qs]
        urls = self._urls(images)
        answers = await self.client.ask_many(
            [[user_message(YES_NO_PROMPT.format(question=q.text), [urls[i]])] for i, q in flat],
            max_tokens=self.max_tokens,
            top_logprobs=self.top_logprobs,
        )
        per_sample: list[list[float | None]] = [[] for _ in images]
        for (i, q), answer in zip(flat, answers):
            p = None if answer is None else yes_score(answer.text, answer.top_logprobs)
            if answer is not None and p is None:
                self.stats.unparseable += 1
            per_sample[i].append(None if p is None else (p if q.expect_yes else 1.0 - p))
        return [
            None if any(p is None for p in ps) else sum(ps) / len(ps)  # type: ignore[arg-type]
            for ps in per_sample
        ]

    async def _rated(
        self, prompts: Sequence[str], images: Sequence[Image.Image]
    ) -> list[float | None]:
        template = SCORE_PROMPT if self.mode == "score" else JSON_PROMPT
        response_format = None
        if self.mode == "json":
            schema = {"name": "rating", "schema": Rating.model_json_schema(), "strict": True}
            response_format = {"type": "json_schema", "json_schema": schema}
        low, high = _num(self.low), _num(self.high)
        answers = await self.client.ask_many(
            [
                [user_message(template.format(prompt=p, low=low, high=high), [url])]
                for p, url in zip(prompts, self._urls(images))
            ],
            max_tokens=self.max_tokens,
            response_format=response_format,
        )
        scores: list[float | None] = []
        for answer in answers:
            score = None if answer is None else self._read(answer.text)
            if answer is not None and score is None:
                self.stats.unparseable += 1
            scores.append(score)
        return scores

    def _read(self, text: str) -> float | None:
        if self.mode == "score":
            return parse_score(text, self.low, self.high)
        rating = parse_json(text, Rating)
        if rating is None or not self.low <= rating.score <= self.high:
            return None
        return (rating.score - self.low) / (self.high - self.low)

    async def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image], metadata: Sequence[dict]
    ) -> list[float | None]:
        if self.mode == "yes_no":
            records = [{"prompt": p, **(m or {})} for p, m in zip(prompts, metadata)]
            return await self._yes_no(images, records)
        return await self._rated(prompts, images)


def _num(x: float) -> str:
    """10.0 -> '10' in prompts: judges are trained on integer scales."""
    return f"{x:g}"
