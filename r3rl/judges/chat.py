"""An OpenAI-compatible chat client for judges (vLLM, SGLang, `transformers serve`, hosted APIs).

Images travel inline as base64 data URLs, so the judge needs no access to our files. Only
the standard chat-completions fields are sent: servers that do not know `logprobs` ignore
it (the scoring then falls back to the text), and strict servers reject unknown fields.
The one exception, vLLM's `structured_outputs` (guided decoding), is sent only to servers
that `HttpPool.served_by` found to be vLLM.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from r3rl.judges.http import HttpPool
from r3rl.judges.scoring import TopLogprobs


@dataclass(frozen=True)
class ChatAnswer:
    """The first choice's text and, when the server returned them, its top log-probs per token."""

    text: str
    top_logprobs: list[TopLogprobs] | None = None


def _format(fmt: str) -> str:
    return "jpeg" if fmt.lower() in ("jpg", "jpeg") else fmt.lower()


def encode_image(image: Image.Image, fmt: str = "png") -> str:
    """Base64 of the image as a file: PNG is lossless, JPEG is ~10x smaller for photos."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=_format(fmt).upper())
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_data_url(image: Image.Image, fmt: str = "png") -> str:
    """A PIL image as a `data:image/...;base64,` URL, how chat APIs take inline images."""
    return f"data:image/{_format(fmt)};base64,{encode_image(image, fmt)}"


def user_message(text: str, image_urls: Sequence[str] = ()) -> dict:
    """One user turn: the images (data URLs, encoded once per image however many questions ask
    about it) first, then the question, the order Qwen-VL judges are trained on."""
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": u}} for u in image_urls
    ]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def parse_answer(body: Any) -> ChatAnswer | None:
    """Read a chat-completions response; None if it is not one (a proxy's error page, junk)."""
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            return None
        content = (choice.get("logprobs") or {}).get("content")
        positions = (
            [
                [(alt["token"], float(alt["logprob"])) for alt in pos["top_logprobs"]]
                for pos in content
            ]
            if content
            else None
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None
    return ChatAnswer(text, positions)


class ChatClient:
    """Many chat completions at once through an `HttpPool`; `None` for each one that failed."""

    def __init__(
        self, pool: HttpPool, model: str, *, temperature: float = 0.0, top_p: float | None = None
    ) -> None:
        self.pool = pool
        self.model = model
        self.temperature = temperature
        self.top_p = top_p  # sent only when set

    async def ask_many(
        self,
        conversations: Sequence[list[dict]],
        *,
        max_tokens: int,
        top_logprobs: int = 0,
        response_format: dict | None = None,
        structured: dict | None = None,
    ) -> list[ChatAnswer | None]:
        """Send each conversation; an answer that is not a chat completion counts as unparseable.

        `structured` is vLLM's `structured_outputs` ({"choice": [...]}, {"regex": ...},
        {"json": schema}): guided decoding, so the answer always has the asked-for shape. Only
        vLLM knows the field (others reject or ignore it): send it only to vLLM servers.
        """
        base: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
        }
        if self.top_p is not None:
            base["top_p"] = self.top_p
        if top_logprobs:
            base |= {"logprobs": True, "top_logprobs": top_logprobs}
        if response_format is not None:
            base["response_format"] = response_format
        if structured is not None:
            base["structured_outputs"] = structured
        bodies = await self.pool.post_many(
            "/chat/completions", [{**base, "messages": m} for m in conversations]
        )
        answers = [None if b is None else parse_answer(b) for b in bodies]
        self.pool.stats.unparseable += sum(
            a is None and b is not None for a, b in zip(answers, bodies)
        )
        return answers
