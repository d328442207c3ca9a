"""geneval: scores from a GenEval-compatible detector server, the way FlowGRPO scores GenEval.

GenEval's detector (mmdetection + CLIP) lives in its own environment, so it runs as a
server. The request is FlowGRPO's (`images` as JPEG, `meta_datas` = the prompt records,
`only_strict`) and the answer's `scores` are the reward: with `partial_credit` the fraction
of the record's constraints met, otherwise 1/0 for all met. Unlike FlowGRPO's client, the
body is JSON (images base64-encoded), never pickle, and `url` is the full endpoint URL, path
included, so nothing guesses a path (R3 posted to a wrong one). Requests follow the judge
rules of `r3rl.judges.http`: timeout, bounded retries, `None` on failure.

    rewards:
      - name: geneval
        args: {url: http://detector-node:18085/geneval, partial_credit: true}
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from r3rl.judges import HttpPool, JudgeStats, encode_image


class GenEval:
    """The reward; `url` may be a list of equivalent detector servers."""

    def __init__(
        self,
        url: str | list[str],
        partial_credit: bool = True,
        api_key_env: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        batch_size: int = 64,
        concurrency: int = 4,
        image_format: str = "jpeg",
    ) -> None:
        self.pool = HttpPool(
            url,
            api_key_env=api_key_env,
            timeout_s=timeout_s,
            max_retries=max_retries,
            concurrency=concurrency,
        )
        self.partial_credit = partial_credit
        self.batch_size = batch_size
        self.image_format = image_format

    @property
    def stats(self) -> JudgeStats:
        return self.pool.stats

    async def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image], metadata: Sequence[dict]
    ) -> list[float | None]:
        records = [{"prompt": p, **(m or {})} for p, m in zip(prompts, metadata)]
        starts = range(0, len(records), self.batch_size)
        return await self.pool.post_scores(
            "",
            [
                {
                    "images": [
                        encode_image(im, self.image_format)
                        for im in images[s : s + self.batch_size]
                    ],
                    "meta_datas": records[s : s + self.batch_size],
                    "only_strict": not self.partial_credit,
                }
                for s in starts
            ],
            [len(records[s : s + self.batch_size]) for s in starts],
        )
