"""The shapes world a diagnostic probes: a folder given on the command line, or the shipped one."""

from __future__ import annotations

from pathlib import Path

from r3rl.config import load_config
from r3rl.shapes.world import WorldPaths, ensure_world

ROOT = Path(__file__).resolve().parents[1]


def world_or_shipped(folder: Path | None) -> WorldPaths:
    """`folder` as a pretrained world, or the cached world of recipes/shapes_cpu.yaml at
    world.seed 0 (pretrained first if missing)."""
    if folder is not None:
        return WorldPaths(folder)
    cfg = load_config(ROOT / "recipes/shapes_cpu.yaml", ["output_dir=/tmp/unused"])
    return ensure_world(cfg.world, 0)
