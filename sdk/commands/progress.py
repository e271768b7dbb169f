"""Progress over a list of items (images): a rich bar on a terminal, a plain line per item elsewhere,
the same two displays as the trainer's (dynseg.trainer.progress), counting images instead of steps."""

from __future__ import annotations

import time
from collections.abc import Callable


class ItemProgress:
    """Prints "[infer] 3/10 coffee.png  4.2 images/s  eta 2s" after every item through `printer`."""

    def __init__(self, label: str, total: int, *, printer: Callable[[str], object] = print):
        self.label, self.total, self.printer = label, total, printer
        self.began = time.perf_counter()

    def rates(self, done: int) -> tuple[float, float]:
        """(items per second, seconds left) after `done` items."""
        elapsed = max(time.perf_counter() - self.began, 1e-9)
        return done / elapsed, elapsed / max(done, 1) * (self.total - done)

    def update(self, done: int, name: str) -> None:
        speed, eta = self.rates(done)
        self.printer(f"[{self.label}] {done}/{self.total} {name}  {speed:.1f} images/s  eta {eta:.0f}s")

    def close(self) -> None:
        pass


class LiveItemProgress(ItemProgress):
    """A rich progress bar with the last item's name, images/s and ETA, redrawn in place."""

    def __init__(self, label: str, total: int, *, printer: Callable[[str], object] = print, console=None):
        super().__init__(label, total, printer=printer)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[name]}  {task.fields[speed]} images/s  eta {task.fields[eta]}"),
                             console=console)
        self._task = self._bar.add_task(label, total=total, name="", speed="-", eta="-")
        self._bar.start()

    def update(self, done: int, name: str) -> None:
        speed, eta = self.rates(done)
        self._bar.update(self._task, completed=done, name=name, speed=f"{speed:.1f}", eta=f"{eta:.0f}s")

    def close(self) -> None:
        self._bar.stop()


def item_progress(label: str, total: int, *, live: bool, printer: Callable[[str], object] = print) -> ItemProgress:
    """`LiveItemProgress` when live (a terminal), else `ItemProgress`."""
    return (LiveItemProgress if live else ItemProgress)(label, total, printer=printer)
