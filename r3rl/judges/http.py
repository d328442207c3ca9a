"""JSON over HTTP to judge servers that may be slow, flaky or down: the one place for retries.

Every remote reward (VLM judges, GenEval detectors, `r3rl serve-rewards`) posts JSON through
`HttpPool`, so they share one set of rules: a cap on requests in flight, several endpoints
with least-busy load balancing (a retry prefers an endpoint other than the one that just
failed), a bearer token read from an environment variable, a hard per-attempt timeout, and
bounded retries with exponential backoff and full jitter. A request that still fails gives
`None`, is counted in `stats`, and never raises: a training step must survive a judge outage.
Bodies are JSON unless a caller passes its own `encode`/`decode` (the GenEval detector's pickle
protocol, opt-in only: `rewards/geneval.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from r3rl.errors import UserError
from r3rl.judges.scoring import scores_from_json

log = logging.getLogger(__name__)

# Worth another try: overload, rate limits and server errors, not the client's own mistakes.
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def json_headers(api_key_env: str | None) -> dict[str, str]:
    """JSON request headers, with `Authorization: Bearer <key>` read from the named variable."""
    headers = {"Content-Type": "application/json"}
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise UserError(f"environment variable {api_key_env} (the API key) is not set")
        headers["Authorization"] = f"Bearer {key}"
    return headers


@dataclass
class JudgeStats:
    """Running counts since the reward was built; `failures + unparseable` samples scored None."""

    requests: int = 0  # logical requests (each may take several attempts)
    attempts: int = 0  # HTTP attempts, retries included
    failures: int = 0  # requests that got no usable answer after all retries
    unparseable: int = 0  # answers that arrived but could not be read as a score


class _Retryable(Exception):
    """A failed attempt that another attempt may fix (timeout, dropped connection, 5xx, garbage)."""


class _Fatal(Exception):
    """A failed attempt that would fail again (4xx other than rate limits)."""


def worst_case_s(
    timeout_s: float, max_retries: int, backoff_s: float, backoff_max_s: float
) -> float:
    """Longest one request can take: every attempt times out and every backoff draws its maximum.

    Backoff before retry k (k = 1..max_retries) is uniform in [0, min(backoff_s * 2**(k-1), cap)].
    """
    waits = sum(min(backoff_s * 2 ** (k - 1), backoff_max_s) for k in range(1, max_retries + 1))
    return (max_retries + 1) * timeout_s + waits


def _urls(base_url: str | Sequence[str]) -> list[str]:
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    if not urls:
        raise UserError("base_url is empty; give a URL such as http://127.0.0.1:8000/v1, or a list")
    for url in urls:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise UserError(f"base_url {url!r} is not an http:// or https:// URL")
    return [u.rstrip("/") for u in urls]


class HttpPool:
    """POST JSON to one of several equivalent endpoints, with timeouts, retries and a cap.

    One `post_many` call opens one connection pool and event-loop-local state, so a pool can be
    used from `asyncio.run` in any thread, one call at a time (how `RewardFn` runs async rewards).
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 32,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
    ) -> None:
        if timeout_s <= 0 or max_retries < 0 or concurrency < 1 or backoff_s < 0:
            raise UserError(
                f"judge limits must be timeout_s > 0, max_retries >= 0, concurrency >= 1, "
                f"backoff_s >= 0; got {timeout_s}, {max_retries}, {concurrency}, {backoff_s}"
            )
        self.urls = _urls(base_url)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.concurrency = int(concurrency)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.headers = json_headers(api_key_env)
        self.stats = JudgeStats()
        self.sent = [0] * len(self.urls)  # attempts per endpoint, for load-balancing checks
        self._busy = [0] * len(self.urls)
        self._turn = 0

    @property
    def worst_case_s(self) -> float:
        """Upper bound on one request's time once it holds a concurrency slot."""
        return worst_case_s(self.timeout_s, self.max_retries, self.backoff_s, self.backoff_max_s)

    def _pick(self, avoid: int | None) -> int:
        """Least-busy endpoint, round-robin among ties, skipping `avoid` when there is a choice."""
        order = [(self._turn + i) % len(self.urls) for i in range(len(self.urls))]
        candidates = [i for i in order if i != avoid] or order
        choice = min(candidates, key=lambda i: self._busy[i])
        self._turn = (choice + 1) % len(self.urls)
        return choice

    async def _attempt(
        self,
        client: httpx.AsyncClient,
        index: int,
        path: str,
        body: bytes,
        decode: Callable[[bytes], Any] | None = None,
        headers: dict | None = None,
    ) -> Any:
        self.stats.attempts += 1
        self.sent[index] += 1
        self._busy[index] += 1
        try:
            resp = await asyncio.wait_for(
                client.post(self.urls[index] + path, content=body, headers=headers or self.headers),
                self.timeout_s,
            )
        except (httpx.TransportError, asyncio.TimeoutError) as e:
            raise _Retryable(f"{type(e).__name__} from {self.urls[index]}") from None
        finally:
            self._busy[index] -= 1
        if resp.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {resp.status_code} from {self.urls[index]}")
        if resp.status_code >= 400:
            raise _Fatal(f"HTTP {resp.status_code} from {self.urls[index]}: {resp.text[:200]}")
        if decode is not None:
            try:
                return decode(resp.content)
            except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the answer is unreadable
                raise _Retryable(
                    f"an unreadable response ({type(e).__name__}) from {self.urls[index]}"
                ) from None
        try:
            return resp.json()
        except ValueError:
            raise _Retryable(f"a response that is not JSON from {self.urls[index]}") from None

    async def _post(
        self,
        client: httpx.AsyncClient,
        slots: asyncio.Semaphore,
        path: str,
        payload: Any,
        codec: tuple[Callable[[Any], bytes], Callable[[bytes], Any], str] | None = None,
    ) -> tuple[Any, str | None]:
        """(JSON answer, None) or (None, why it failed); never raises for remote trouble."""
        headers = None
        if codec is not None:
            body = codec[0](payload)
            headers = {**self.headers, "Content-Type": codec[2]}
        else:
            try:
                body = json.dumps(payload, allow_nan=False).encode()  # once, not per attempt
            except (TypeError, ValueError) as e:
                raise UserError(
                    f"a judge request is not JSON ({e}); check the prompt metadata"
                ) from None
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_random_exponential(multiplier=self.backoff_s, max=self.backoff_max_s),
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        last: int | None = None
        async with slots:
            self.stats.requests += 1
            try:
                async for attempt in retrying:
                    with attempt:
                        last = self._pick(avoid=last)
                        decode = None if codec is None else codec[1]
                        return await self._attempt(client, last, path, body, decode, headers), None
            except (_Retryable, _Fatal) as e:
                self.stats.failures += 1
                return None, str(e)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def post_many(
        self,
        path: str,
        payloads: Sequence[Any],
        codec: tuple[Callable[[Any], bytes], Callable[[bytes], Any], str] | None = None,
    ) -> list[Any]:
        """POST each payload to `endpoint + path` concurrently; `None` where a request failed.

        `codec` = (encode, decode, content type) replaces JSON for both the body and the answer."""
        if not payloads:
            return []
        slots = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
            outcomes = await asyncio.gather(
                *(self._post(client, slots, path, p, codec) for p in payloads)
            )
        errors = Counter(err for _, err in outcomes if err is not None)
        if errors:
            reasons = "; ".join(f"{n}x {err}" for err, n in errors.most_common(3))
            log.warning(
                "%d of %d judge requests failed after up to %d retries (%s)",
                sum(errors.values()),
                len(payloads),
                self.max_retries,
                reasons,
            )
        return [answer for answer, _ in outcomes]

    async def served_by(self) -> str | None:
        """`owned_by` of the first model listed by `GET /models` (vLLM says "vllm"), from the first
        endpoint (in order) that answers it; "" from a server without that route (not vLLM, which
        always has it); None when no endpoint could say (down, starting, refusing the key): ask
        again later. All endpoints are asked at once with one attempt of at most
        min(timeout_s, 5) s, not retried and not counted in `stats`: a probe for what the server
        can do, not a judge request."""

        async def ask(client: httpx.AsyncClient, url: str) -> str | None:
            try:
                resp = await client.get(url + "/models", headers=self.headers)
            except httpx.TransportError:
                return None
            if resp.status_code in (404, 405):
                return ""
            if resp.status_code != 200:
                return None
            try:
                return str(resp.json()["data"][0].get("owned_by", ""))
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                return ""

        limit = min(self.timeout_s, 5.0)
        async with httpx.AsyncClient(timeout=limit) as client:
            try:
                owners = await asyncio.wait_for(
                    asyncio.gather(*(ask(client, u) for u in self.urls)), limit + 1.0
                )
            except asyncio.TimeoutError:
                return None
        return next((o for o in owners if o is not None), None)

    async def post_scores(
        self,
        path: str,
        payloads: Sequence[Any],
        sizes: Sequence[int],
        key: str = "scores",
        codec: tuple[Callable[[Any], bytes], Callable[[bytes], Any], str] | None = None,
    ) -> list[float | None]:
        """POST batches answered with `{"scores": [...]}` (or `key`; a reward server, a GenEval
        detector): one score or None per sample, in order; an answer that is not n scores counts as
        unparseable."""
        scores: list[float | None] = []
        for n, body in zip(sizes, await self.post_many(path, payloads, codec)):
            chunk = None if body is None else scores_from_json(body, n, key)
            self.stats.unparseable += body is not None and chunk is None
            scores.extend([None] * n if chunk is None else chunk)
        return scores
