"""remote: a reward hosted by `r3rl serve-rewards` on another node, called over HTTP.

Use it for rewards that need another machine's GPU or another environment's packages. The
body is JSON (images as base64 PNG), authenticated with a bearer token read from an
environment variable, and requests follow the judge rules of `r3rl.judges.http`: a timeout
per attempt, bounded retries with backoff and jitter, `None` for samples that still fail.

    rewards:
      - name: remote
        args: {url: http://reward-node:8750, reward: shapes_geneval, token_env: R3RL_REWARD_TOKEN}

`reward` is the name the server lists at startup (`GET /v1/rewards`). Batches larger than
`batch_size` are split, so keep it at or below the server's `--max-batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from PIL import Image

from r3rl.judges import HttpPool, JudgeStats, encode_image

TOKEN_ENV = "R3RL_REWARD_TOKEN"


class Remote:
    """The reward; `url` may be a list of servers hosting the same reward."""

    def __init__(
        self,
        url: str | list[str],
        reward: str,
        token_env: str | None = TOKEN_ENV,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        batch_size: int = 64,
        concurrency: int = 4,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
    ) -> None:
        self.pool = HttpPool(
            url,
            api_key_env=token_env,
            timeout_s=timeout_s,
            max_retries=max_retries,
            concurrency=concurrency,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
        )
        self.reward = reward
        self.batch_size = batch_size

    @property
    def stats(self) -> JudgeStats:
        return self.pool.stats

    async def __call__(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image],
        metadata: Sequence[dict],
        **kwargs: Any,
    ) -> list[float | None]:
        completions = kwargs.get("completions")
        starts = range(0, len(prompts), self.batch_size)
        payloads = []
        for s in starts:
            cut = slice(s, s + self.batch_size)
            payload: dict[str, Any] = {
                "prompts": list(prompts[cut]),
                "images": [encode_image(im) for im in images[cut]],
                "metadata": list(metadata[cut]),
            }
            if completions is not None:
                payload["completions"] = list(completions[cut])
            payloads.append(payload)
        path = f"/v1/rewards/{quote(self.reward, safe='')}"
        return await self.pool.post_scores(path, payloads, [len(p["prompts"]) for p in payloads])
