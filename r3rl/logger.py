"""Run outputs in one place: metrics.jsonl, TensorBoard scalars and image grids, a progress bar.

Only rank 0 writes (`enabled=False` elsewhere turns every method into a no-op), so the rest of
the code can log unconditionally. Nothing else in r3rl prints during a run; messages go through
`RunLogger.info` so they appear above the progress bar instead of breaking it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter

if TYPE_CHECKING:
    from r3rl.config import Config

Metric = float | int | str | None


def quiet_libraries() -> None:
    """Silence transformers/diffusers per-call progress bars and info logs: the run has one bar."""
    import diffusers
    import transformers

    for lib in (transformers, diffusers):
        lib.utils.logging.disable_progress_bar()
        lib.utils.logging.set_verbosity_error()


def _plain(key: str, value: Any) -> Metric:
    """A JSON-safe metric value: tensor/numpy scalars become numbers, NaN/inf become null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN; the caller logs its own non-finite counter
    if value is None or isinstance(value, (str, int, float)):
        return value
    raise TypeError(
        f"metric '{key}' has type {type(value).__name__}; expected a number, string or None"
    )


def _drop_rows_from(path: Path, start_step: int) -> None:
    """Keep only rows of steps before `start_step`, so a resumed run's file equals an uninterrupted
    one.

    Also drops a half-written last line left by a killed run. A fresh run (start_step 0)
    starts an empty file.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] < start_step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _wrap(
    text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, max_lines: int
) -> list[str]:
    """Greedy word wrap to a pixel width; the last kept line ends with '...' when text is cut."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    return lines


def image_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    *,
    ncols: int | None = None,
    cell_size: int = 128,
    max_caption_lines: int = 6,
) -> Image.Image:
    """Images in a grid, each resized to `cell_size` wide with its caption below.

    Tiny images are enlarged with nearest-neighbour so their pixels stay readable.
    `ncols` defaults to one row; pass the number of rounds to get one sample per row.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images to put in a grid")
    ncols = ncols or len(images)
    nrows = math.ceil(len(images) / ncols)
    pad = 4
    font = ImageFont.load_default()
    line_height = int(font.getbbox("Hg")[3]) + 2
    cells = [
        im.convert("RGB").resize(
            (cell_size, max(1, round(im.height * cell_size / im.width))),
            Image.Resampling.NEAREST if im.width < cell_size else Image.Resampling.LANCZOS,
        )
        for im in images
    ]
    wrapped = [_wrap(c, font, cell_size, max_caption_lines) for c in captions]
    image_h = max(c.height for c in cells)
    caption_h = max(len(w) for w in wrapped) * line_height
    cell_w, cell_h = cell_size + pad, image_h + caption_h + 2 * pad
    grid = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (cell, lines) in enumerate(zip(cells, wrapped)):
        x, y = pad + (i % ncols) * cell_w, pad + (i // ncols) * cell_h
        grid.paste(cell, (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + image_h + pad + j * line_height), line, fill="black", font=font)
    return grid


class RunLogger:
    """Writes `metrics.jsonl`, TensorBoard events and `config.yaml` under `output_dir`,
    and shows a progress bar (step/total, reward, step time, ETA) on stderr.

    `start_step` is the first step this run will log: rows and events from an earlier,
    interrupted run at or after it are dropped, so resuming does not duplicate steps.
    """

    def __init__(
        self, output_dir: str | Path, *, total_steps: int, enabled: bool = True, start_step: int = 0
    ) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.output_dir / "metrics.jsonl"
        _drop_rows_from(metrics_path, start_step)
        self._metrics = metrics_path.open("a", encoding="utf-8")
        self._writer = SummaryWriter(
            log_dir=str(self.output_dir / "tensorboard"), purge_step=start_step, flush_secs=10
        )
        self._progress = Progress(
            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
            BarColumn(),
            TextColumn("reward {task.fields[reward]}"),
            TextColumn("{task.fields[step_s]} s/step"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task = self._progress.add_task(
            "train", total=total_steps, completed=start_step, reward="-", step_s="-"
        )
        self._progress.start()

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one row `{"step": step, **metrics}` to metrics.jsonl (flushed) and its numbers
        to TensorBoard."""
        if not self.enabled:
            return
        row: dict[str, Metric] = {"step": step}
        row.update({key: _plain(key, value) for key, value in metrics.items()})
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)
        fields = {}
        if isinstance(row.get("reward/mean"), (int, float)):
            fields["reward"] = f"{row['reward/mean']:.3f}"
        if isinstance(row.get("time/step_s"), (int, float)):
            fields["step_s"] = f"{row['time/step_s']:.2f}"
        self._progress.update(self._task, completed=step, **fields)

    def log_images(
        self,
        step: int,
        tag: str,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        *,
        ncols: int | None = None,
    ) -> None:
        """Write an image grid with a caption (e.g. prompt + reflection) under each image."""
        if not self.enabled:
            return
        grid = image_grid(images, captions, ncols=ncols)
        self._writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")

    def info(self, message: str) -> None:
        """Print a message above the progress bar (checkpoint saved, how to resume, ...)."""
        if self.enabled:
            self._progress.console.print(message, soft_wrap=True)  # paths stay copyable

    def save_config(self, cfg: Config) -> Path:
        """Write the fully resolved recipe to `config.yaml`, so a run can be repeated from its
        outputs."""
        path = self.output_dir / "config.yaml"
        if self.enabled:
            path.write_text(cfg.to_yaml(), encoding="utf-8")
        return path

    def close(self) -> None:
        """Stop the progress bar and flush and close the files; safe to call twice."""
        if not self.enabled:
            return
        self.enabled = False
        self._progress.stop()
        self._writer.close()
        self._metrics.close()

    def __enter__(self) -> RunLogger:  # noqa: PYI034 (py3.10: no typing.Self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
