"""The exceptions and warnings dynseg raises: one base class for the errors, so callers can catch
everything dynseg-specific, and one category per warning, so callers can filter it."""

from __future__ import annotations


class DynsegError(Exception):
    """Base class of every error dynseg raises on purpose."""


class InvalidArgumentError(DynsegError, ValueError):
    """An argument is out of its documented range; the message names it and the offending value."""


class NativeError(DynsegError, RuntimeError):
    """The native kernel library is missing, mismatched or failed for a reason other than bad input."""


class DetectionsDroppedWarning(UserWarning):
    """Some detections were left out (inverted or outside boxes); the result records which."""
