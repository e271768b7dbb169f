"""How a training stage reports its progress: the loss, throughput (images/s) and the time left.

Two displays with one interface: `PlainProgress` prints a line every `every` steps through a printer
(for logs, CI and anything that is not a terminal), `LiveProgress` draws a rich progress bar that
updates in place (for a terminal). `stage_progress` picks one. The clock and the bar are the
deployment commands' (dynseg.sdk.commands.progress); this module adds what is the trainer's: the loss,
averaged between lines, and notes such as an epoch's metrics.

Throughput and ETA count only the steps this run made (a resumed run starts its clock at the step it
resumed from) at the pace of about the last minute (`ProgressClock.rates`): images/s = images processed
/ seconds over it, ETA = seconds per step over it x steps left; the epoch log's images_per_s is the pace
since the stage began (`ProgressClock.throughput`). All include data loading and, where it runs,
held-out evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dynseg.sdk.commands.progress import LiveBar, ProgressClock

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["PlainProgress", "LiveProgress", "Progress", "stage_progress"]


class PlainProgress(ProgressClock):
    """A line every `every` steps and at the last step:
    "[semantic] step 20/600  loss 0.4123  35.2 images/s  eta 81s", the loss averaged over the steps
    since the previous line.

    Args:
        stage: the name in brackets.
        total: the stage's last step; start: the step it begins after (0, or where it resumed).
        images_per_step: images one step processes (over all processes).
    """

    def __init__(self, stage: str, total: int, start: int, *, images_per_step: int,
                 printer: Callable[[str], object] = print, every: int = 10):
        super().__init__(total, start, items_per_step=images_per_step)
        self.stage, self.printer, self.every = stage, printer, max(1, every)
        self._losses: list[float] = []

    def update(self, step: int, loss: float) -> None:
        """Step `step` (1-based) finished with this loss."""
        self._losses.append(loss)
        if step % self.every and step != self.total:
            return
        mean = sum(self._losses) / len(self._losses)
        self._losses.clear()
        self.printer(f"[{self.stage}] step {step}/{self.total}  loss {mean:.4f}  {self.rate_text(step)}")

    def note(self, text: str) -> None:
        """A one-off message (an epoch's held-out metrics)."""
        self.printer(text)

    def close(self) -> None:
        pass


class LiveProgress(ProgressClock):
    """A rich progress bar with the latest loss, images/s and ETA, redrawn in place; PlainProgress's
    interface (update, note, close) and arguments, less the printer and the line interval.

    Args:
        console: a rich Console to draw on (default: rich's console on stdout).
    """

    def __init__(self, stage: str, total: int, start: int, *, images_per_step: int,
                 console: Console | None = None) -> None:
        super().__init__(total, start, items_per_step=images_per_step)
        self._bar = LiveBar(stage, total, "loss {task.fields[loss]}", completed=start, console=console, loss="-")

    def update(self, step: int, loss: float) -> None:
        self._bar.update(step, self.rate_text(step), loss=f"{loss:.4f}")

    def note(self, text: str) -> None:
        self._bar.print(text)

    def close(self) -> None:
        self._bar.close()


Progress = PlainProgress | LiveProgress


def stage_progress(stage: str, total: int, start: int, *, images_per_step: int, live: bool,
                   printer: Callable[[str], object] = print, every: int = 10) -> Progress:
    """`LiveProgress` when live (a terminal), else `PlainProgress` printing through `printer` every
    `every` steps."""
    if live:
        return LiveProgress(stage, total, start, images_per_step=images_per_step)
    return PlainProgress(stage, total, start, images_per_step=images_per_step, printer=printer, every=every)
