"""The exceptions dynseg raises: one base class, so callers can catch everything dynseg-specific."""

from __future__ import annotations


class DynsegError(Exception):
    """Base class of every error dynseg raises on purpose."""


class InvalidArgumentError(DynsegError, ValueError):
    """An argument is out of its documented range; the message names it and the offending value."""


class NativeError(DynsegError, RuntimeError):
    """The native kernel library is missing, mismatched or failed for a reason other than bad input."""
