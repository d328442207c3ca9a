"""vlm_judge: score images with a vision-language model served behind an OpenAI-compatible API.

Serve the judge with vLLM (see launch/vllm/) and point a recipe at it:

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
- `json`: the same score as a JSON object `{"score": N, "reason": "..."}`.
- R3's judges (sen-ye/R3 `train/reward_func.py`), whose requests are R3's byte for byte
  (`r3rl.judges.r3`): `r3_geneval_plus` (GenEval++ training: a strict JSON verdict
  `{"correct": 1|0}` on R3's checklist of the record's include/exclude, region and size),
  `r3_geneval_plus_eval` (its evaluation prompt), `r3_vqa` (TIIF training: the record's
  `yn_question_list` answered as JSON, scored against `yn_answer_list`) and `r3_tiif` (TIIF
  evaluation: one yes/no line per question; `exact_case: true` keeps R3's case-sensitive compare,
  under which an expected "Yes" never matches). They send R3's sampling settings (temperature 0,
  top_p 0.9, max_tokens 4096, a JPEG image), never log-probs or guided decoding; an answer R3
  would score 0 for want of a reading is `None` here.

Guided decoding (`guided`: `auto` (default) | true | false). A judge that writes free text can
ramble past `max_tokens` or forget the score; with vLLM's structured outputs every answer has
the asked-for shape and fits the token budget: `yes_no` may only answer yes or no (P(yes) is then
the first token's probability mass on the spellings of "yes"), `score` writes at most
`max_tokens` minus the tail's length of printable ASCII and then `Final Score: N` with N one of
the allowed values, `json` writes exactly `{"score": N, "reason": "..."}` with the reason's
length bounded the same way (ASCII without quotes or backslashes: one character is at least one
token, so the bound in characters is a bound in tokens). `auto` uses it when the server's
`GET /models` says vLLM (`owned_by: vllm`); other servers get plain requests (json mode then
sends the standard `response_format` JSON schema, with `score` bounded to the scale and the
reason's `maxLength` to the budget).

A sample whose answers cannot be had or read scores `None`; `stats` counts why.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image
from pydantic import BaseModel, Field

from r3rl.errors import UserError
from r3rl.judges import (
    R3_MODES,
    ChatClient,
    HttpPool,
    JudgeStats,
    geneval_questions,
    image_data_url,
    parse_json,
    parse_score,
    r3_messages,
    r3_texts,
    read_r3,
    user_message,
    yes_score,
)

MODES = ("yes_no", "score", "json", *R3_MODES)
DEFAULT_MAX_TOKENS = {"yes_no": 4, "score": 256, "json": 256} | {m: 4096 for m in R3_MODES}

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


# The guided reason's characters: printable ASCII without quote or backslash (no JSON escapes),
# so each character is at least one token and a length in characters bounds the tokens.
REASON_CHARS = r"[a-zA-Z0-9 ,.;:!?()'/+*=<>-]"
FREE_CHARS = r"[ -~\n]"  # score mode's free-text explanation: printable ASCII and newlines
YES_NO_CHOICES = ["yes", "no", "Yes", "No"]
MAX_ENUMERATED = 101  # integer scales up to this many values are spelled out as alternatives


class Rating(BaseModel):
    """The JSON answer of `json` mode, as read (the schema sent is tighter: `VLMJudge.schema`)."""

    score: float
    reason: str = Field("", max_length=4000)


def _scale(low: float, high: float) -> tuple[str, int]:
    """A regex for a number on [low, high] and the longest text it matches.

    Integer scales (1-5, 1-10, 0-100) list every allowed value; other scales (0-1) take a decimal
    with up to 3 digits after the point, whose range is checked after reading."""
    if low.is_integer() and high.is_integer() and 2 <= high - low < MAX_ENUMERATED:
        values = [str(v) for v in range(int(low), int(high) + 1)]
        values.sort(key=len, reverse=True)  # longest first: "10" before "1"
        return "(" + "|".join(values) + ")", max(map(len, values))
    digits = len(str(int(max(abs(low), abs(high)))))
    return rf"-?[0-9]{{1,{digits}}}(\.[0-9]{{1,3}})?", 1 + digits + 4


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
        image_format: str | None = None,
        top_p: float | None = None,
        exact_case: bool = False,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        guided: bool | str = "auto",
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
        if guided not in (True, False, "auto"):
            raise UserError(f"vlm_judge guided={guided!r} is invalid: expected auto, true or false")
        r3 = mode in R3_MODES
        self.client = ChatClient(pool, model, temperature=temperature,
                                 top_p=top_p if top_p is not None or not r3 else 0.9)
        self.mode = mode
        self.low, self.high = float(min_score), float(max_score)
        self.max_tokens = max_tokens or DEFAULT_MAX_TOKENS[mode]
        self.top_logprobs = top_logprobs
        self.image_format = image_format or ("jpeg" if r3 else "png")  # R3 sends JPEG
        self.exact_case = exact_case
        self.guided = guided
        self._vllm: bool | None = None  # what `guided: auto` found the server to be
        self._number, number_len = _scale(self.low, self.high)
        # the longest fixed text around the free part of a score / json answer, plus one token
        # for the end of the turn: what is left of max_tokens bounds the explanation
        tail = {"yes_no": 0, "score": len("\nFinal Score: "), "json": len('{"score": , "reason": ""}')}
        self.reason_chars = self.max_tokens - tail.get(mode, 0) - number_len - 1
        if mode in ("score", "json") and self.reason_chars < 0:
            raise UserError(
                f"vlm_judge max_tokens={self.max_tokens} is too small for mode={mode}: the answer's "
                f"fixed part alone takes {self.max_tokens - self.reason_chars} tokens"
            )

    @property
    def stats(self) -> JudgeStats:
        return self.client.pool.stats

    async def _use_guided(self) -> bool:
        """Whether to send vLLM's structured outputs: `guided`, or for `auto` whether the server
        is vLLM (asked once; until a server answers, plain requests)."""
        if self.guided != "auto":
            return bool(self.guided)
        if self._vllm is None:
            owner = await self.client.pool.served_by()
            if owner is not None:
                self._vllm = owner == "vllm"
        return bool(self._vllm)

    def structured(self, guided: bool) -> dict | None:
        """vLLM's `structured_outputs` for this mode (None without guided decoding)."""
        if not guided:
            return None
        if self.mode == "yes_no":
            return {"choice": YES_NO_CHOICES}
        if self.mode == "score":
            return {"regex": f"{FREE_CHARS}{{0,{self.reason_chars}}}\\n[Ff]inal [Ss]core: {self._number}"}
        return {"regex": rf'\{{"score": {self._number}, "reason": "{REASON_CHARS}{{0,{self.reason_chars}}}"\}}'}

    def schema(self) -> dict:
        """The JSON schema of `json` mode's answer as sent in `response_format` (servers without
        guided decoding): the score bounded to the scale, the reason to what fits max_tokens."""
        return {
            "type": "object",
            "properties": {
                "score": {"type": "number", "minimum": self.low, "maximum": self.high},
                "reason": {"type": "string", "maxLength": self.reason_chars},
            },
            "required": ["score", "reason"],
            "additionalProperties": False,
        }

    def _urls(self, images: Sequence[Image.Image]) -> list[str]:
        return [image_data_url(im, self.image_format) for im in images]

    async def _yes_no(
        self, images: Sequence[Image.Image], metadata: Sequence[dict]
    ) -> list[float | None]:
        questions = [geneval_questions(m) for m in metadata]
        flat = [(i, q) for i, qs in enumerate(questions) for q in qs]
        urls = self._urls(images)
        guided = await self._use_guided()
        answers = await self.client.ask_many(
            [[user_message(YES_NO_PROMPT.format(question=q.text), [urls[i]])] for i, q in flat],
            max_tokens=self.max_tokens,
            top_logprobs=self.top_logprobs,
            structured=self.structured(guided),
        )
        per_sample: list[list[float | None]] = [[] for _ in images]
        for (i, q), answer in zip(flat, answers):
            p = (
                None
                if answer is None
                else yes_score(answer.text, answer.top_logprobs, constrained=guided)
            )
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
        guided = await self._use_guided()
        response_format = None
        if self.mode == "json" and not guided:
            schema = {"name": "rating", "schema": self.schema(), "strict": True}
            response_format = {"type": "json_schema", "json_schema": schema}
        low, high = _num(self.low), _num(self.high)
        answers = await self.client.ask_many(
            [
                [user_message(template.format(prompt=p, low=low, high=high), [url])]
                for p, url in zip(prompts, self._urls(images))
            ],
            max_tokens=self.max_tokens,
            response_format=response_format,
            structured=self.structured(guided),
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

    def r3_conversations(
        self, prompts: Sequence[str], images: Sequence[Image.Image], metadata: Sequence[dict]
    ) -> list[list[dict]]:
        """The messages of R3's request for each sample (R3 modes)."""
        return [
            r3_messages(*r3_texts(self.mode, p, {"prompt": p, **(m or {})}), url)
            for p, m, url in zip(prompts, metadata, self._urls(images))
        ]

    async def _r3(
        self, prompts: Sequence[str], images: Sequence[Image.Image], metadata: Sequence[dict]
    ) -> list[float | None]:
        answers = await self.client.ask_many(
            self.r3_conversations(prompts, images, metadata), max_tokens=self.max_tokens
        )
        scores: list[float | None] = []
        for answer, m in zip(answers, metadata):
            score = None if answer is None else read_r3(self.mode, answer.text, m or {}, self.exact_case)
            if answer is not None and score is None:
                self.stats.unparseable += 1
            scores.append(score)
        return scores

    async def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image], metadata: Sequence[dict]
    ) -> list[float | None]:
        if self.mode in R3_MODES:
            return await self._r3(prompts, images, metadata)
        if self.mode == "yes_no":
            records = [{"prompt": p, **(m or {})} for p, m in zip(prompts, metadata)]
            return await self._yes_no(images, records)
        return await self._rated(prompts, images)


def _num(x: float) -> str:
    """10.0 -> '10' in prompts: judges are trained on integer scales."""
    return f"{x:g}"
