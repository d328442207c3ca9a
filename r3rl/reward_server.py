"""`r3rl serve-rewards`: host reward functions over HTTP for trainers on other nodes.

Rewards that need their own GPU or their own environment run here; trainers call them
with the `remote` reward plugin. The server is safe to leave running on a shared network:
it binds 127.0.0.1 unless told otherwise, every scoring call needs the bearer token, the
body is JSON only (a pickle is never loaded: unpickling runs code the sender chose), and
request size and batch size are capped before any work is done.

    POST /v1/rewards/{name}  {"prompts": [...], "images": [base64 PNG/JPEG/WebP], "metadata": [...],
                              "completions": [...] (text rewards)}  ->  {"scores": [float | null]}
    GET  /v1/rewards         names of the hosted rewards (token required)
    GET  /health             {"status": "ok"} (no token: for load balancers and probes)

Errors are JSON `{"error": "..."}`: 401 bad or missing token, 400 malformed body, 404
unknown reward, 413 body or batch too large, 500 the reward raised.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from r3rl.errors import ConfigError, UserError
from r3rl.rewards import CombinedReward, RewardFn

log = logging.getLogger(__name__)

TOKEN_ENV = "R3RL_REWARD_TOKEN"
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # decoders reachable from the network: a short list


class ScoreRequest(BaseModel):
    """A batch to score; `images` may be empty for text rewards."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str]
    images: list[str] = []
    metadata: list[dict[str, Any]] | None = None
    completions: list[str | None] | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> ScoreRequest:
        n = len(self.prompts)
        for name in ("images", "metadata", "completions"):
            value = getattr(self, name)
            if value and len(value) != n:
                raise ValueError(f"{name} has {len(value)} items for {n} prompts")
        return self


class _Reject(Exception):
    """An HTTP error answer: status and one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _decode_image(data: str, i: int) -> Image.Image:
    try:
        raw = base64.b64decode(data, validate=True)
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        image.load()
    except (
        binascii.Error,
        ValueError,
        UnidentifiedImageError,
        OSError,
        Image.DecompressionBombError,
    ) as e:
        raise _Reject(400, f"images[{i}] is not a base64 PNG, JPEG or WebP image ({e})") from None
    return image.convert("RGB")


class _App:
    """The request handlers, holding the rewards and the limits."""

    def __init__(
        self, rewards: Mapping[str, RewardFn], token: str, max_body_bytes: int, max_batch: int
    ):
        self.rewards = dict(rewards)
        self.token = token.encode()
        self.max_body_bytes = max_body_bytes
        self.max_batch = max_batch

    def _check_token(self, request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise _Reject(401, "missing bearer token: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(given.strip().encode(), self.token):
            raise _Reject(401, "wrong bearer token")

    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the cap, whatever Content-Length says."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _Reject(
                413, f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes}"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _Reject(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(self, request: Request) -> ScoreRequest:
        body = await self._body(request)
        try:
            data = json.loads(body)  # bytes of any other format (pickle included) fail here
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Reject(
                400, f"body is not valid JSON ({e}); this server speaks JSON only"
            ) from None
        prompts = data.get("prompts") if isinstance(data, dict) else None
        if isinstance(prompts, list) and len(prompts) > self.max_batch:
            raise _Reject(
                413, f"batch of {len(prompts)} samples exceeds the limit of {self.max_batch}"
            )
        try:
            return ScoreRequest.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise _Reject(400, f"invalid request: {where}: {first['msg']}") from None

    async def score(self, request: Request) -> JSONResponse:
        try:
            self._check_token(request)
            name = request.path_params["name"]
            fn = self.rewards.get(name)
            if fn is None:
                raise _Reject(404, f"no reward '{name}' here; hosted: {', '.join(self.rewards)}")
            req = await self._parse(request)
            images = [_decode_image(d, i) for i, d in enumerate(req.images)]
            kwargs = {} if req.completions is None else {"completions": req.completions}
            metadata = req.metadata or [{"prompt": p} for p in req.prompts]
            try:
                scores = await run_in_threadpool(fn, req.prompts, images, metadata, **kwargs)
            except Exception as e:  # the reward's failure, reported to the caller, who retries
                log.exception("reward %s failed", name)
                raise _Reject(500, f"reward '{name}' failed: {type(e).__name__}: {e}") from None
        except _Reject as e:
            headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
            return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)
        return JSONResponse({"scores": scores})

    async def names(self, request: Request) -> JSONResponse:
        try:
            self._check_token(request)
        except _Reject as e:
            return JSONResponse(
                {"error": str(e)}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return JSONResponse({"rewards": list(self.rewards)})

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})


def create_app(
    rewards: Mapping[str, RewardFn],
    token: str,
    *,
    max_body_bytes: int = 64 << 20,
    max_batch: int = 256,
) -> Starlette:
    """The ASGI app; `serve` runs it with uvicorn, tests may mount it anywhere."""
    if not token:
        raise UserError("the reward server needs a non-empty bearer token")
    app = _App(rewards, token, max_body_bytes, max_batch)
    return Starlette(
        routes=[
            Route("/health", app.health, methods=["GET"]),
            Route("/v1/rewards", app.names, methods=["GET"]),
            Route("/v1/rewards/{name}", app.score, methods=["POST"]),
        ]
    )


def load_rewards(path: str | Path) -> dict[str, RewardFn]:
    """The `rewards:` list of a recipe (or of a YAML file with only that list), loaded."""
    from r3rl.config import RewardSpec

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config error: {path} is not valid YAML ({str(e).splitlines()[0]})"
        ) from None
    raw = data.get("rewards") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"config error: {path} has no 'rewards' list to serve")
    try:
        specs = [RewardSpec.model_validate(item) for item in raw]
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"config error: {path}: rewards: {first['msg']}") from None
    combined = CombinedReward(specs)
    return dict(zip(combined.keys, combined.fns))


def serve(
    path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8750,
    token_env: str = TOKEN_ENV,
    max_body_mb: float = 64.0,
    max_batch: int = 256,
) -> None:
    """Load the rewards of `path` and serve them until interrupted."""
    import uvicorn

    token = os.environ.get(token_env, "")
    if not token:
        raise UserError(
            f"set {token_env} to a secret token; callers send it as 'Authorization: Bearer <token>'"
        )
    rewards = load_rewards(path)
    app = create_app(
        rewards, token, max_body_bytes=int(max_body_mb * (1 << 20)), max_batch=max_batch
    )
    print(
        f"serving rewards {', '.join(rewards)} on http://{host}:{port} (token from ${token_env})",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
