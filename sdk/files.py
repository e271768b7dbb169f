"""Files a user hands dynseg and files dynseg writes for them: a file to read must be a regular one (named
when it is not), and a file written (a model, results, metrics, pictures, timings) appears whole or not
at all, a failure naming it (`writing`, also for files written otherwise, as a checkpoint's are)."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from .errors import InvalidArgumentError


def write_whole(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Runs `write` on a hidden file beside `path`, then moves that file over `path`: a reader never sees a
    cut-off file (a full disk, an interrupted run), and a failure leaves what `path` held before. `write`
    must not tell the format by the name it is given (Pillow does: `write_png_whole`). Raises OSError naming
    `path`, its errno kept, also where a folder, pipe or device is at `path` (it would be replaced); the
    hidden file never stays. Returns `path`."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise OSError(errno.EEXIST, "a folder, pipe or device is there, not a file to replace", str(path))
    partial = partial_path(path)
    try:
        with writing(path):
            write(partial)
            os.replace(partial, path)
    finally:
        with suppress(OSError):  # a read-only folder refuses even this: its error, named above, is the one
            partial.unlink(missing_ok=True)
    return path


def partial_path(path: Path) -> Path:
    """Where `write_whole` writes `path` first: a hidden file beside it, named for this process and thread
    (two writers of one path never share it), its name within NAME_MAX wherever `path`'s is: the name's
    first 40 characters (160 bytes at most) say whose it is."""
    return path.with_name(f".{path.name[:40]}.{os.getpid()}.{threading.get_ident()}.partial")


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError inside raised again naming `path`, the file being written, its errno kept (the error
    may name only a hidden partial copy, or nothing)."""
    try:
        yield
    except OSError as error:
        if error.errno is None:
            raise OSError(f"could not write {path}: {error}") from error
        raise OSError(error.errno, error.strerror, str(path)) from error


def write_text_whole(path: str | os.PathLike[str], text: str) -> Path:
    """`write_whole` of a text file."""
    return write_whole(path, lambda partial: partial.write_text(text))


def write_png_whole(path: str | os.PathLike[str], picture: np.ndarray) -> Path:
    """`write_whole` of `picture` as a PNG: (H, W, 3) uint8 RGB, or (H, W) uint8 or uint16 grey."""
    from PIL import Image  # Pillow loads where a picture is written, not with every module that reads a file

    return write_whole(path, lambda partial: Image.fromarray(picture).save(partial, format="PNG"))


def named_path(path: object, what: str) -> Path:
    """`path` as a Path, or InvalidArgumentError naming `what` where it names nothing: not a str or
    os.PathLike of one, empty (which Path would read as the current folder), or holding a NUL byte
    (which no file name can, and which the system calls would refuse with a bare ValueError)."""
    location = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(location, str):
        raise InvalidArgumentError(f"{what} must be a str or os.PathLike of one, got {type(path).__name__}")
    if not location:
        raise InvalidArgumentError(f"{what} must not be an empty path")
    if "\x00" in location:
        raise InvalidArgumentError(f"{what} {location!r} holds a NUL byte, which no file name can")
    return Path(location)


def check_regular_file(path: object, what: str) -> Path:
    """`path` as a Path; InvalidArgumentError naming `what` (e.g. "detections file") and `path` unless
    `path` is a regular file: one that does not exist, a folder, or a pipe or device (a stream, which may
    never end, so it is not read: give a file), or one that cannot be looked at (a name too long, a
    folder on the way that may not be searched), or no path at all (`named_path`)."""
    path = named_path(path, what)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidArgumentError(f"{what} {path} does not exist") from None
    except OSError as error:
        raise InvalidArgumentError(f"{what} {path} cannot be opened: {error.strerror or error}") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise InvalidArgumentError(f"{what} {path} is a folder, not a file")
    raise InvalidArgumentError(f"{what} {path} is a pipe or device, not a regular file")
