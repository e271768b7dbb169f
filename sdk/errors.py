"""The exceptions and warnings dynseg raises: one base class for the errors, so callers can catch
everything dynseg-specific, and one category per warning, so callers can filter it; the install
command the errors that need the trainer give (`needs_trainer`); and `one_line`, how a foreign exception
is quoted in dynseg's one-line messages. The TensorRT engine's two errors, `EngineError` and
`EngineMismatchError` (both BackendErrors), live with the engine reader in `tensorrt_engine`."""

from __future__ import annotations

import importlib.util


# What an error that needs the trainer tells the user to run (from a checkout: dynseg is not on PyPI).
# PyTorch's CPU index beside PyPI: PyPI's Linux torch is a multi-GB CUDA build.
INSTALL_TRAINER = ('pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu '
                   '&& pip install "dynseg[train]" (in a checkout: pip install ".[train]")')


class DynsegError(Exception):
    """Base class of every error dynseg raises on purpose."""


class InvalidArgumentError(DynsegError, ValueError):
    """An argument is out of its documented range; the message names it and the offending value."""


class LatticeRangeError(InvalidArgumentError):
    """A CRF's thetas are too small for the image: its features span more lattice cells than the
    lattice's 64-bit keys can number. Whether a theta fits depends on the image (its size, and its
    colours' spread for the bilateral kernel), so a model can pass on one image and fail on another."""


class NativeError(DynsegError, RuntimeError):
    """The native kernel library is missing, mismatched or failed for a reason other than bad input."""


class BackendError(DynsegError, RuntimeError):
    """The runtime under a backend (onnxruntime, PyTorch, TensorRT) could not load the model or run it on
    inputs that passed dynseg's checks: out of memory, a provider that failed, or a model edited outside
    dynseg. The message names the runtime and what it was doing, and quotes its error on one line."""


class DetectionsDroppedWarning(UserWarning):
    """Some detections were left out (inverted or outside boxes); the result records which."""


def needs_trainer(what: str, error: ImportError) -> str:
    """Why `what` (e.g. "dynseg train") cannot run, `error` having stopped the import of torch or dynseg's
    trainer: how to install them, or, where torch is installed but would not load (a broken install, too
    little memory to map its libraries), torch's own reason."""
    if importlib.util.find_spec("torch") is None:
        return f"{what} needs PyTorch: {INSTALL_TRAINER}"
    return f"{what} needs PyTorch, which is installed but could not be imported: {one_line(error)}"


def one_line(error: BaseException, limit: int = 300) -> str:
    """A foreign exception's message on one line (torch's and safetensors' run to many), cut at a word
    after about `limit` characters; its type's name when it has no message (a bare MemoryError)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."

