"""geneval: scores from a GenEval-compatible detector server, the way FlowGRPO scores GenEval.

GenEval's detector (mmdetection + CLIP) lives in its own environment, so it runs as a
server. The request is FlowGRPO's (`images` as JPEG, `meta_datas` = the prompt records,
`only_strict`) and the answer's `scores` are the reward: with `partial_credit` the fraction
of the record's constraints met, otherwise 1/0 for all met. Unlike FlowGRPO's client, the
body is JSON (images base64-encoded) unless the recipe opts into pickle (below), and `url`
is the full endpoint URL, path included, so nothing guesses a path (R3 posted to a wrong one). Requests follow the judge
rules of `r3rl.judges.http`: timeout, bounded retries, `None` on failure.

    rewards:
      - name: geneval
        args: {url: http://detector-node:18085/geneval, partial_credit: true}

The stock server (yifan123/reward-server `app_geneval.py`, which flow_grpo and R3 call) speaks
pickle instead: the body is `pickle.dumps({"images": [JPEG bytes], "meta_datas": [...],
"only_strict": bool})` and the answer a pickled dict of `scores` (the fraction of the record's
constraints met, exact counts), `rewards` (GenEval's correct: at-least counts; computed only when
`only_strict` is false), `strict_rewards` (all met, exact counts) and per-tag groups. r3rl talks to
it only when the recipe opts in, because unpickling an answer runs whatever code the server (or
anyone who can answer in its place) puts there:

      - name: geneval
        args: {url: http://127.0.0.1:18085/, protocol: pickle, allow_pickle: true,
               score_field: scores}   # scores (flow_grpo's and R3's training reward) | rewards | strict_rewards

`score_field` defaults to `scores` with `partial_credit`, else `strict_rewards`; `only_strict` is
sent true unless `rewards` is asked for (flow_grpo's training request). Use it only with a server
you run, on a network you trust (127.0.0.1 or an SSH tunnel).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence

from PIL import Image

from r3rl.errors import UserError
from r3rl.judges import HttpPool, JudgeStats, encode_image

PROTOCOLS = ("json", "pickle")
SCORE_FIELDS = ("scores", "rewards", "strict_rewards")


def jpeg_bytes(image: Image.Image) -> bytes:
    """The image as flow_grpo and R3 send it: PIL's JPEG at its default quality."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def _unpickle(content: bytes) -> object:
    return pickle.loads(content)  # opt-in (allow_pickle): the README states the risk


PICKLE_CODEC = (pickle.dumps, _unpickle, "application/octet-stream")


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
        protocol: str = "json",
        allow_pickle: bool = False,
        score_field: str | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise UserError(f"geneval protocol={protocol!r} is invalid: expected one of {', '.join(PROTOCOLS)}")
        if protocol == "pickle" and allow_pickle is not True:
            raise UserError(
                "geneval protocol=pickle needs allow_pickle: true in the reward's args: unpickling the "
                "server's answer runs any code it sends; use it only with a detector server you run"
            )
        if score_field is not None and score_field not in SCORE_FIELDS:
            raise UserError(
                f"geneval score_field={score_field!r} is invalid: expected one of {', '.join(SCORE_FIELDS)}"
            )
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
        self.protocol = protocol
        default_field = "scores" if partial_credit or protocol == "json" else "strict_rewards"
        self.score_field = score_field or default_field
        # the stock server computes `rewards` only when not only_strict; JSON servers keep r3rl's rule
        self.only_strict = (self.score_field != "rewards") if protocol == "pickle" else not partial_credit

    @property
    def stats(self) -> JudgeStats:
        return self.pool.stats

    async def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image], metadata: Sequence[dict]
    ) -> list[float | None]:
        records = [{"prompt": p, **(m or {})} for p, m in zip(prompts, metadata)]
        starts = range(0, len(records), self.batch_size)
        if self.protocol == "pickle":
            return await self.pool.post_scores(
                "",
                [
                    {
                        "images": [jpeg_bytes(im) for im in images[s : s + self.batch_size]],
                        "meta_datas": records[s : s + self.batch_size],
                        "only_strict": self.only_strict,
                    }
                    for s in starts
                ],
                [len(records[s : s + self.batch_size]) for s in starts],
                key=self.score_field,
                codec=PICKLE_CODEC,
            )
        return await self.pool.post_scores(
            "",
            [
                {
                    "images": [
                        encode_image(im, self.image_format)
                        for im in images[s : s + self.batch_size]
                    ],
                    "meta_datas": records[s : s + self.batch_size],
                    "only_strict": self.only_strict,
                }
                for s in starts
            ],
            [len(records[s : s + self.batch_size]) for s in starts],
            key=self.score_field,
        )
