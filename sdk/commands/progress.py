"""Progress displays: the clock and the rich bar every display shares, and the per-image display of the
deployment commands.

`ProgressClock` turns steps done into throughput and time left; `LiveBar` is the rich progress bar drawn
in place on a terminal. `ItemProgress` (a plain line per item) and `LiveItemProgress` (the bar) count
images, shown for the length of a block by `shown`; the trainer's per-step displays
(dynseg.trainer.progress) are built on the same two.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


# The pace the display shows and the time left follows: that of about the last minute. Since the start
# would hide a machine that slows down (another job starting), and the time left would run out long
# before the run does; a few steps would swing with each step's own noise.
PACE_SECONDS = 60.0


class ProgressClock:
    """Throughput and time left of a run that ends at step `total` and began after step `start` (0, or
    where a resumed run picked up), each step `items_per_step` images. The clock starts when it is made."""

    def __init__(self, total: int, start: int = 0, *, items_per_step: int = 1):
        self.total, self.start, self.items_per_step = total, start, items_per_step
        self.began = time.perf_counter()
        self._readings = deque([(start, self.began)])  # (step, time) from about PACE_SECONDS ago to now

    def throughput(self, step: int) -> float:
        """Images per second since the start, after `step` (1-based)."""
        return (step - self.start) * self.items_per_step / max(time.perf_counter() - self.began, 1e-9)

    def rates(self, step: int) -> tuple[float, float]:
        """(images per second, seconds left at that pace) after `step` (1-based), over about the last
        PACE_SECONDS."""
        now = time.perf_counter()
        readings = self._readings
        readings.append((step, now))
        while len(readings) > 2 and now - readings[1][1] >= PACE_SECONDS:  # the oldest still spans the window
            readings.popleft()
        first_step, first_time = readings[0]
        done, elapsed = step - first_step, max(now - first_time, 1e-9)
        return done * self.items_per_step / elapsed, elapsed / max(done, 1) * (self.total - step)

    def rate_text(self, step: int) -> str:
        """"4.2 images/s  eta 2s" after `step`: the pace of about the last minute."""
        speed, eta = self.rates(step)
        return f"{speed:.1f} images/s  eta {eta:.0f}s"


class LiveBar:
    """A rich progress bar redrawn in place: the label in bold, the bar, done/total, then `text` (a format
    over the task's fields, such as "loss {task.fields[loss]}", shown without rich markup: a file named
    "cat [copy].png" keeps its brackets) and the throughput and time left.
    `fields` are the fields' values before the first update; console: a rich Console to draw on (default:
    rich's console on stdout)."""

    def __init__(self, label: str, total: int, text: str, *, completed: int = 0, console: Console | None = None,
                 **fields: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn(text + "  {task.fields[rate]}", markup=False),
                             console=console)
        values: dict[str, Any] = {"rate": "- images/s  eta -", **fields}  # rich's task fields
        self._task = self._bar.add_task(label, total=total, completed=completed, **values)
        self._bar.start()

    def update(self, completed: int, rate: str, **fields: str) -> None:
        values: dict[str, Any] = {"rate": rate, **fields}
        self._bar.update(self._task, completed=completed, **values)

    def print(self, text: str) -> None:
        """A line above the bar, printed as it is (no rich markup)."""
        self._bar.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        self._bar.stop()


class ItemProgress(ProgressClock):
    """Prints "[infer] 3/10 coffee.png  4.2 images/s  eta 2s" after every item through `printer`."""

    def __init__(self, label: str, total: int, *, printer: Callable[[str], object] = print):
        super().__init__(total)
        self.label, self.printer = label, printer

    def update(self, done: int, name: str) -> None:
        self.printer(f"[{self.label}] {done}/{self.total} {name}  {self.rate_text(done)}")

    def close(self) -> None:
        pass


class LiveItemProgress(ItemProgress):
    """A rich progress bar with the last item's name, images/s and ETA, redrawn in place."""

    def __init__(self, label: str, total: int, *, printer: Callable[[str], object] = print,
                 console: Console | None = None) -> None:
        super().__init__(label, total, printer=printer)
        self._bar = LiveBar(label, total, "{task.fields[name]}", console=console, name="")

    def update(self, done: int, name: str) -> None:
        self._bar.update(done, self.rate_text(done), name=name)

    def close(self) -> None:
        self._bar.close()


def item_progress(label: str, total: int, *, live: bool, printer: Callable[[str], object] = print) -> ItemProgress:
    """`LiveItemProgress` when live (a terminal), else `ItemProgress`."""
    return (LiveItemProgress if live else ItemProgress)(label, total, printer=printer)


@contextmanager
def shown(progress: Callable[[int], ItemProgress] | None, total: int) -> Iterator[Callable[[int, str], None]]:
    """The `update(done, name)` of the display `progress(total)` makes, closed on leaving (also on an
    error); one that shows nothing where `progress` is None. What infer, eval and validate count with."""
    display = progress(total) if progress is not None else None
    try:
        yield display.update if display is not None else (lambda done, name: None)
    finally:
        if display is not None:
            display.close()
