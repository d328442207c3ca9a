"""reflection_format: 1.0 when a reflection has R3's shape, else 0.0 (a TRL-style text reward).

The shape is `<think>reasoning</think> verdict`, the verdict being an edit instruction or
"no further edit needed"; `r3rl.models.reflector.parse_reflection` is the one definition of
it, shared with the rollout. Useful as a shaping term for the reflector:

    rewards:
      - {name: reflection_format, weight: 0.2}
"""

from __future__ import annotations

from collections.abc import Sequence

from r3rl.models.reflector import parse_reflection


def reflection_format(
    prompts: Sequence[str], completions: Sequence[str | None], **kwargs
) -> list[float | None]:
    """Score each reflection; `completions` are the reflections (TRL's name), as text or as TRL
    passes a chat model's (`[{"role": "assistant", "content": text}]`), None where a sample has
    none to score."""
    texts = [t[-1]["content"] if isinstance(t, list) and t else t for t in completions]
    return [float(parse_reflection(t)[1]) if isinstance(t, str) else None for t in texts]
