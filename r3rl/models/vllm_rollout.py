"""Reflector rollouts on a vLLM server: sampling, weight sync, truncated importance sampling.

The trainer keeps its `HFReflector` (the policy it differentiates); a vLLM server holding the
same checkpoint samples the reflections. Three pieces:

- `VLLMRollout.reflect` has `HFReflector.reflect`'s signature and result: one request per distinct
  (prompt, image) with `n` samples (a group shares one image in R3's refine step), the same user
  turn (image + REFLECTION_PROMPT) through the server's chat template, the same stop and banned
  tokens, token ids back (`return_tokens_as_token_ids`) and the sampled tokens' log-probs.
  Those are log-probs of the distribution sampled (temperature, top-k, top-p applied) only when
  the server runs with `--logprobs-mode processed_logprobs`; `launch/vllm/serve.sh` with
  `ROLLOUT=1` and `rollout_server_args()` set it.
- `VLLMRollout.sync` puts the trainer's weights on the server: they are saved as a checkpoint
  folder (LoRA merged into the base weights) and the server's workers reload it in place
  (`POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}`, served
  with `VLLM_SERVER_DEV_MODE=1`), then the server's prefix, multimodal and encoder caches are
  reset (without the encoder reset the next image request crashes the engine: "Encoder cache
  miss"; without the prefix reset it reuses keys and values of the old weights). This works on
  the CPU build and on GPUs alike; vLLM's RL weight-transfer API (`/update_weights` with the nccl
  or ipc engines) is CUDA-only, and runtime LoRA loading covers LoRA policies only. The sync is
  verified: the server samples a probe sequence and its log-probs must equal the trainer's
  within `verify_tol` (a stale or half-loaded server fails loudly, never samples silently).
  `reflect` syncs first whenever the trainer's parameters changed since the last sync
  (their in-place version counters moved, i.e. an optimiser step ran).
- `truncated_importance_weights`: TRL's `vllm_importance_sampling_correction`: per token,
  `min(exp(logp_trainer - logp_vllm), cap)` multiplies the policy loss, so tokens the server
  over-sampled relative to the trainer's own distribution weigh less; with the mismatch metrics
  `rollout/logprob_diff_mean`, `rollout/is_ratio_mean`, `rollout/is_ratio_max`.

Several trainer processes (plain gloo/nccl ranks, no DeepSpeed) share ONE server: rank 0 opens
it (a `launch`ed server is rank 0's) and tells the others its URL and model; after each
optimiser step (every rank then holds the same weights) rank 0 alone saves, reloads and verifies
them while the others wait for its verdict (a broadcast), so every rank proceeds from the same
verified weight version or raises the same error. Every rank samples the whole group with the
same seeds (r3rl.rollout), so the requests are split instead of repeated: each rank sends its
block of the distinct groups' requests and the answers are gathered, every rank then holding
the same reflections. Why shared, not a server per rank: the ranks must agree on the
reflections, which N servers sampling the same requests would give only if their sampling were
bit-identical (batching on GPUs is not); one server is reloaded once per step, not N times (one
weight write; on GPU nodes one vLLM's memory, not N); here on CPU two servers barely fit. A rank
whose request fails still joins the gather (each request is bounded by `timeout_s`), so every
rank raises the same `RolloutError`, checkpoints and stops; none waits at a collective for a
rank that left. DeepSpeed is refused: ZeRO shards the weights (and, at stage 3, the forwards
need every rank), and the sync saves and probes the module rank 0 holds.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
from peft import PeftModel
from PIL import Image

from r3rl.distributed import Topology, any_rank, block, from_main, gather
from r3rl.errors import UserError
from r3rl.judges.chat import image_data_url
from r3rl.judges.http import json_headers
from r3rl.judges.vllm_server import VLLMServer, free_port
from r3rl.models.reflector import REFLECTION_PROMPT, HFReflector, Reflection

PROBE_PROMPT = "a red circle"
# the probe samples at a temperature other than 1: a server that reports raw log-probs (not
# `--logprobs-mode processed_logprobs`) then fails the check instead of skewing every IS weight
PROBE_TEMPERATURE = 0.7
DEV_MODE_HINT = (
    "serve it with VLLM_SERVER_DEV_MODE=1 and --logprobs-mode processed_logprobs "
    "(launch/vllm/serve.sh with ROLLOUT=1, or reflector.vllm.launch=true)"
)


def rollout_server_args() -> tuple[list[str], dict[str, str]]:
    """vLLM arguments and environment a rollout server needs: log-probs of the sampled
    distribution, and the dev-mode `/collective_rpc` and cache-reset routes for weight sync."""
    return ["--logprobs-mode", "processed_logprobs"], {"VLLM_SERVER_DEV_MODE": "1"}


class RolloutError(UserError):
    """The rollout server cannot be reached, answered something unusable, or did not take the
    weights: one line saying which and what to check."""


def truncated_importance_weights(
    trainer_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor, cap: float = 2.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token weights `min(exp(trainer - rollout), cap)` (0 on padding) and the mismatch metrics.

    `trainer_logps` are the trainer's log-probs of the sampled tokens under the weights that
    sampled them (the PPO `old` log-probs), `rollout_logps` what vLLM reported for the same
    tokens. The metrics are over the valid tokens: mean |difference|, mean and max of the ratio
    before truncation (so a max above `cap` shows truncation at work).
    """
    if cap < 1.0:
        raise ValueError(f"the importance-sampling cap must be >= 1, got {cap}")
    mask = mask.bool()
    diff = (trainer_logps - rollout_logps).detach().float()
    ratio = torch.exp(diff).masked_fill(~mask, 0.0)
    weights = ratio.clamp(max=cap).masked_fill(~mask, 0.0)
    n = int(mask.sum())
    metrics = {
        "rollout/logprob_diff_mean": float(diff.abs()[mask].mean()) if n else 0.0,
        "rollout/is_ratio_mean": float(ratio[mask].mean()) if n else 1.0,
        "rollout/is_ratio_max": float(ratio[mask].max()) if n else 1.0,
    }
    return weights, metrics


def served_logprobs(reflections: Sequence[Reflection], like: torch.Tensor) -> torch.Tensor:
    """(B, T) the sampler's log-probs of each reflection's tokens, zero-padded to `like`'s shape
    (the trainer's log-probs of the same tokens)."""
    out = torch.zeros(like.shape, dtype=torch.float32)
    for i, r in enumerate(reflections):
        out[i, : len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
    return out.to(like.device)


def behaviour_logprobs(
    reflections: Sequence[Reflection],
    logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    from_vllm: bool,
    cap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """(old log-probs for the PPO ratio, loss mask, per-token IS weights or None, metrics).

    Sampled by the trainer's own `generate`: its behaviour log-probs. Sampled by vLLM (TRL's
    vllm_importance_sampling_correction, token_truncate): the old log-probs are the trainer's own
    under the weights that sampled (one update per rollout), each token's loss weighted
    min(p_trainer / p_vllm, cap); a token vLLM kept but the trainer's filter drops is masked."""
    if not from_vllm:
        return served_logprobs(reflections, logps), mask, None, {}
    old = logps.detach()
    mask = mask & torch.isfinite(old)
    weights, metrics = truncated_importance_weights(
        old, served_logprobs(reflections, logps), mask, cap=cap
    )
    return old, mask, weights, metrics


def _fingerprint(model: torch.nn.Module) -> tuple[int, ...]:
    """In-place version counters of the trainable (else all) parameters: they move on every
    optimiser step, so a changed fingerprint means the server's weights are stale."""
    params = [p for p in model.parameters() if p.requires_grad] or list(model.parameters())
    return tuple(p._version for p in params)


class VLLMRollout:
    """Sample reflections from a vLLM server that holds `reflector`'s checkpoint, synced to it."""

    def __init__(
        self,
        reflector: HFReflector,
        base_url: str,
        model: str,
        *,
        sync_dir: str | Path | None = None,
        timeout_s: float = 120.0,
        verify_tol: float = 1e-3,
        api_key_env: str | None = None,
        server: VLLMServer | None = None,
        topo: Topology | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"rollout base_url {base_url!r} is not an http:// or https:// URL")
        self.reflector = reflector
        self.base = base_url.rstrip("/")  # the OpenAI base, .../v1
        self.root = self.base.removesuffix("/v1")
        self.model = model
        self.timeout_s = float(timeout_s)
        self.verify_tol = float(verify_tol)
        self.headers = json_headers(api_key_env)
        # the server reads the weights from here: a folder it can see (same node or shared FS)
        self.sync_dir = Path(sync_dir) if sync_dir else Path(tempfile.mkdtemp(prefix="r3rl-sync-"))
        self.version = 0  # syncs done; the server holds the trainer's weights as of `_synced`
        self._synced: tuple[int, ...] | None = None
        self.last_sync: dict[str, float] = {}
        self.server = server  # one this run started (launch / command): close() stops it
        self.topo = topo or Topology()  # several ranks share the server (rank 0 syncs it)

    def close(self) -> None:
        """Stop the server this run started (a server given by URL is left running)."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _unreachable(self, url: str, error: Exception) -> RolloutError:
        """One line: the server is gone (with a launched server's exit code and log) or silent."""
        proc = self.server.proc if self.server is not None else None
        if proc is not None and proc.poll() is not None:
            log = self.server.log_path or "(no log)"
            return RolloutError(
                f"the rollout server exited with code {proc.returncode} (log: {log}); "
                f"request to {url} failed"
            )
        what = "timed out" if isinstance(error, httpx.TimeoutException) else "unreachable"
        return RolloutError(
            f"rollout server {url} {what} ({type(error).__name__}, limit "
            f"{self.timeout_s:g} s: reflector.vllm.timeout_s): is it running?"
        )

    # ------------------------------------------------------------------ HTTP
    def describe(self) -> str:
        return (
            f"reflector rollouts from vLLM at {self.base} ({self.model}): weights synced and "
            f"verified (max |dlogp| {self.last_sync['rollout/sync_max_diff']:.1e})"
        )

    def _post(self, path: str, body: dict | None, *, root: bool = False) -> Any:
        url = (self.root if root else self.base) + path
        try:
            resp = httpx.post(url, json=body, headers=self.headers, timeout=self.timeout_s)
        except httpx.TransportError as e:
            raise self._unreachable(url, e) from None
        if resp.status_code == 404 and root:
            raise RolloutError(f"rollout server has no {path} route: {DEV_MODE_HINT}")
        if resp.status_code != 200:
            text = " ".join(resp.text[:200].split())
            raise RolloutError(f"rollout server {url} answered HTTP {resp.status_code}: {text}")
        try:
            return resp.json() if resp.content else None  # the cache resets answer an empty body
        except ValueError:
            raise RolloutError(
                f"rollout server {url} answered something that is not JSON"
            ) from None

    async def _chat(self, client: httpx.AsyncClient, body: dict) -> dict:
        url = self.base + "/chat/completions"
        try:
            resp = await client.post(url, json=body, headers=self.headers)
        except httpx.TransportError as e:
            raise self._unreachable(url, e) from None
        if resp.status_code != 200:
            text = " ".join(resp.text[:200].split())
            raise RolloutError(f"rollout server {url} answered HTTP {resp.status_code}: {text}")
        return resp.json()

    # ------------------------------------------------------------------ sampling
    def _body(self, prompt: str, image: Image.Image, n: int, temperature: float, top_k: int,
              top_p: float, max_new_tokens: int, seed: int | None) -> dict:  # fmt: skip
        r = self.reflector
        text = REFLECTION_PROMPT.format(prompt=prompt)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(image, "png")}},
                {"type": "text", "text": text}]}],
            "n": n, "max_tokens": max_new_tokens,
            "temperature": temperature, "top_k": top_k if top_k > 0 else -1, "top_p": top_p,
            "logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True,
            "stop_token_ids": r.stop_ids, "skip_special_tokens": False,
            # generate's suppress_tokens: placeholders never appear in a completion
            "logit_bias": {str(i): -100 for i in r.banned_ids},
            # what HFReflector pins neutral, whatever the checkpoint's generation_config says
            "repetition_penalty": 1.0, "min_p": 0.0,
        }  # fmt: skip
        if seed is not None:
            body["seed"] = int(seed)
        return body

    def _parse(self, answer: dict, n: int) -> list[tuple[list[int], list[float]]]:
        try:
            out = []
            for choice in sorted(answer["choices"], key=lambda c: c["index"]):
                content = choice["logprobs"]["content"]
                ids = [int(p["token"].removeprefix("token_id:")) for p in content]
                out.append((ids, [float(p["logprob"]) for p in content]))
        except (KeyError, TypeError, ValueError) as e:
            raise RolloutError(
                f"rollout server answer without token ids and log-probs ({e!r}); {DEV_MODE_HINT}"
            ) from None
        if len(out) != n:
            raise RolloutError(f"rollout server returned {len(out)} samples, {n} asked")
        return out

    def reflect(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image],
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[Reflection]:
        """`HFReflector.reflect` on the server (syncing first if the weights moved). Each group of
        identical (prompt, image) pairs is one request with `n` samples."""
        if any_rank(self._synced != _fingerprint(self.reflector.model), self.topo):
            self.sync()
        groups: dict[tuple[str, int], list[int]] = {}
        for i, (p, im) in enumerate(zip(prompts, images)):
            groups.setdefault((p, id(im)), []).append(i)
        bodies = [
            self._body(prompts[idx[0]], images[idx[0]], len(idx), temperature, top_k, top_p,
                       max_new_tokens, None if seed is None else seed + k)
            for k, idx in enumerate(groups.values())
        ]  # fmt: skip

        sizes = [len(idx) for idx in groups.values()]
        mine = block(len(bodies), self.topo)  # all of them in one process

        async def run() -> list[dict]:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                return await asyncio.gather(*(self._chat(client, bodies[k]) for k in mine))

        def fetch() -> list[list[tuple[list[int], list[float]]]]:
            return [self._parse(a, sizes[k]) for k, a in zip(mine, asyncio.run(run()))]

        if not self.topo.distributed:
            samples = fetch()
        else:
            try:
                part, failed = fetch(), None
            except RolloutError as e:  # still joins the gather: the other ranks must not wait
                part, failed = [], str(e)
            parts = gather([(failed, part)], self.topo)
            errors = [(r, e) for r, (e, _) in enumerate(parts) if e is not None]
            if errors:
                rank, why = errors[0]
                raise RolloutError(f"rank {rank}: {why}")
            samples = [pairs for _, p in parts for pairs in p]
        out: list[Reflection | None] = [None] * len(prompts)
        for idx, pairs in zip(groups.values(), samples):
            for i, (ids, logps) in zip(idx, pairs):
                out[i] = self.reflector._reflection(ids, logps)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ weight sync
    def _save(self) -> None:
        """The trainer's weights as a checkpoint folder in the base model's names (LoRA merged)."""
        model = self.reflector.model
        if self.sync_dir.exists():
            shutil.rmtree(self.sync_dir)
        if isinstance(model, PeftModel):
            model.merge_adapter()
            try:
                base = model.get_base_model()
                state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items()
                         if "lora_" not in k}  # fmt: skip
                base.save_pretrained(self.sync_dir, state_dict=state)
            finally:
                model.unmerge_adapter()
        else:
            model.save_pretrained(self.sync_dir)

    def sync(self) -> dict[str, float]:
        """Put the trainer's current weights on the server and verify them; metrics of the sync.
        Several ranks: rank 0 syncs while the others wait for its verdict (all ranks hold the
        same weights after a step); all raise its error, or all take its verified version."""
        if not self.topo.distributed:
            return self._sync()
        verdict: dict[str, float] | str | None = None
        if self.topo.is_main:
            try:
                verdict = self._sync()
            except RolloutError as e:  # told to the others before raising: none waits forever
                verdict = str(e)
        verdict = from_main(verdict, self.topo)
        self._synced = _fingerprint(self.reflector.model)
        if isinstance(verdict, str):
            raise RolloutError(verdict)
        self.version = int(verdict["rollout/weight_version"])
        self.last_sync = dict(verdict)
        return self.last_sync

    def _sync(self) -> dict[str, float]:
        start = time.perf_counter()
        self._save()
        self._post(
            "/collective_rpc",
            {"method": "reload_weights", "kwargs": {"weights_path": str(self.sync_dir)}},
            root=True,
        )
        for path in ("/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache"):
            self._post(path, None, root=True)
        self._synced = _fingerprint(self.reflector.model)
        self.version += 1
        diff = self.check()
        if not diff <= self.verify_tol:  # NaN fails too
            raise RolloutError(
                f"weight sync {self.version} did not take: the server's log-probs differ from the "
                f"trainer's by {diff:.2e} (> {self.verify_tol:g}: reflector.vllm.verify_tol); does "
                f"it serve the reflector's checkpoint, read {self.sync_dir}, and report processed "
                "log-probs (--logprobs-mode processed_logprobs)?"
            )
        self.last_sync = {
            "rollout/sync_s": time.perf_counter() - start,
            "rollout/sync_max_diff": diff,
            "rollout/weight_version": float(self.version),
        }
        return self.last_sync

    def check(self, n: int = 2, max_new_tokens: int = 8) -> float:
        """Largest |server - trainer| log-prob over a probe: the server samples `n` sequences
        (seeded, temperature PROBE_TEMPERATURE, no filters), the trainer scores the same tokens."""
        image = Image.new("RGB", (32, 32), (200, 30, 30))
        t = PROBE_TEMPERATURE
        body = self._body(PROBE_PROMPT, image, n, t, 0, 1.0, max_new_tokens, 0)
        pairs = self._parse(self._post("/chat/completions", body), n)
        logps, mask, _ = self.reflector.completion_logprobs(
            [PROBE_PROMPT] * n, [image] * n, [ids for ids, _ in pairs],
            temperature=t, top_k=0, top_p=1.0, with_grad=False,
        )  # fmt: skip
        served = torch.zeros_like(logps)
        for i, (_, lp) in enumerate(pairs):
            served[i, : len(lp)] = torch.tensor(lp)
        return float((logps.float().cpu() - served.cpu()).abs()[mask.cpu()].max())


# ---------------------------------------------------------------------- from a recipe


def _get(url: str, timeout_s: float, headers: dict[str, str]) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=timeout_s, headers=headers)
    except httpx.TransportError:
        return None


def open_rollout(
    vc: Any,
    reflector: HFReflector,
    model_path: str | Path,
    output_dir: str | Path,
    topo: Topology | None = None,
) -> VLLMRollout:
    """The rollout client a recipe's `reflector.vllm` section (`VLLMRolloutConfig`) describes:
    a running server at `url`, one r3rl launches from the vLLM env with the reflector's
    checkpoint (`launch`), or one a shell `command` starts. Every failure is one `RolloutError`
    line; a server this function started is stopped before it raises. Several ranks: rank 0
    opens (and launches) it, the others get its URL and model, or its error."""
    topo = topo or Topology()
    if not topo.distributed:
        return _open(vc, reflector, model_path, output_dir, topo)
    told: tuple[str, str] | str | None = None
    rollout = None
    if topo.is_main:
        try:
            rollout = _open(vc, reflector, model_path, output_dir, topo)
            told = (rollout.base, rollout.model)
        except UserError as e:
            told = str(e)
    told = from_main(told, topo)
    if isinstance(told, str):
        raise RolloutError(told)
    if rollout is None:
        url, model = told
        rollout = _client(vc, reflector, url, model, output_dir, topo)
    return rollout


def _client(
    vc: Any,
    reflector: HFReflector,
    url: str,
    model: str,
    output_dir: str | Path,
    topo: Topology,
    server: VLLMServer | None = None,
) -> VLLMRollout:
    """The trainer's side of the server at `url` serving `model`, set up from `reflector.vllm`."""
    return VLLMRollout(
        reflector, url, model, sync_dir=vc.sync_dir or Path(output_dir) / "vllm-sync",
        timeout_s=vc.timeout_s, verify_tol=vc.verify_tol, api_key_env=vc.api_key_env,
        server=server, topo=topo,
    )  # fmt: skip


def _open(
    vc: Any, reflector: HFReflector, model_path: str | Path, output_dir: str | Path, topo: Topology
) -> VLLMRollout:
    modes = [m for m, on in (("url", vc.url and not (vc.launch or vc.command)),
                             ("launch", vc.launch), ("command", vc.command)) if on]  # fmt: skip
    if len(modes) != 1:
        raise UserError(
            "reflector.rollout=vllm needs exactly one of reflector.vllm.url (a running server), "
            "reflector.vllm.launch=true or reflector.vllm.command (with url); got "
            + (", ".join(modes) if modes else "none")
        )
    out = Path(output_dir)
    log = out / "vllm-rollout.log"
    server: VLLMServer | None = None
    if vc.launch:
        host, port = "127.0.0.1", None
        if vc.url:
            where = httpx.URL(vc.url)
            host, port = where.host, where.port
        args, env = rollout_server_args()
        server = VLLMServer(
            model_path, served_model_name=vc.model or "reflector", host=host,
            port=port or free_port(host),
            max_model_len=vc.max_model_len, extra_args=[*args, *vc.extra_args], venv=vc.venv,
            log_path=log, threads=vc.threads, kv_cache_gib=vc.kv_cache_gib, env=env,
        )  # fmt: skip
    elif vc.command:
        if not vc.url:
            raise UserError("reflector.vllm.command needs reflector.vllm.url (where it serves)")
        server = VLLMServer.from_command(vc.command, vc.url, log_path=log)
    url = server.base_url if server is not None else vc.url
    if server is not None:
        out.mkdir(parents=True, exist_ok=True)
        try:
            server.start(timeout_s=vc.startup_timeout_s)
        except RuntimeError as e:
            why = str(e).split("; log tail:")[0]
            raise RolloutError(f"the rollout server did not start: {why} (log: {log})") from None
    try:
        headers = json_headers(vc.api_key_env)
        root = url.rstrip("/").removesuffix("/v1")
        health = _get(f"{root}/health", min(vc.timeout_s, 30.0), headers)
        if health is None or health.status_code != 200:
            said = "no answer" if health is None else f"HTTP {health.status_code}"
            raise RolloutError(
                f"rollout server {url} is not up ({said} from /health): start it with "
                "launch/vllm/serve.sh (ROLLOUT=1) or set reflector.vllm.launch=true"
            )
        model = vc.model or (server.name if server is not None and vc.launch else None)
        if model is None:
            resp = _get(url.rstrip("/") + "/models", min(vc.timeout_s, 30.0), headers)
            names = (
                [m.get("id") for m in resp.json().get("data", [])]
                if resp is not None and resp.status_code == 200
                else []
            )
            if len(names) != 1:
                raise RolloutError(
                    f"rollout server {url} serves {names or 'no models'}: set reflector.vllm.model"
                )
            model = names[0]
        rollout = _client(vc, reflector, url, model, out, topo, server)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    return rollout
