"""Range checks for the trainer's configuration dataclasses (ModelConfig, SemanticCRFConfig,
InstanceConfig, TrainConfig), called from their __post_init__: a field out of range raises
InvalidArgumentError naming `Class.field`, when the config is made or read from a checkpoint, rather
than training or running something else (a misspelt stage, a negative iteration count) or failing
later under another name."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeGuard

import numpy as np

from dynseg.sdk.errors import InvalidArgumentError
from dynseg.sdk.checks import is_int


def _fail(config: object, name: str, rule: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{type(config).__name__}.{name} must be {rule}, got {getattr(config, name)!r}")


def _is_number(value: object) -> TypeGuard[float]:
    # Python numbers only: configs are written to JSON as they are
    return is_int(value, numpy=False) or isinstance(value, float)


def choices(config: object, name: str, allowed: Iterable[object]) -> None:
    allowed = tuple(allowed)
    if getattr(config, name) not in allowed:
        raise _fail(config, name, " or ".join(repr(a) for a in allowed))


def flags(config: object, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise _fail(config, name, "True or False")


def ints(config: object, *names: str, least: int, most: int | None = None) -> None:
    for name in names:
        value = getattr(config, name)
        if not is_int(value, numpy=False) or value < least or (most is not None and value > most):
            raise _fail(config, name, f"an int >= {least}" if most is None else f"an int in {least}..{most}")


def numbers(config: object, *names: str, low: float = -math.inf, high: float = math.inf,
            low_open: bool = False, high_open: bool = False, float32: bool = False) -> None:
    """Finite numbers in [low, high], either end open as said; with `float32`, still so once rounded to
    the float32 that the network computes with and the exported CRF node stores (1e-300 > 0 is 0 there)."""
    def inside(value: object) -> bool:
        return _is_number(value) and math.isfinite(value) and (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)

    for name in names:
        value = getattr(config, name)
        if not inside(value):
            raise _fail(config, name, _number_rule(low, high, low_open, high_open))
        if float32:
            with np.errstate(over="ignore"):  # 1e39 becomes inf, which `inside` refuses
                rounded = float(np.float32(value))
            if not inside(rounded):
                raise _fail(config, name, _number_rule(low, high, low_open, high_open) + " once rounded to float32")


def _number_rule(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """"a finite number in [0, 1)", or "> 0" where only one end bounds it, or nothing more without either."""
    if math.isinf(low) and math.isinf(high):
        return "a finite number"
    if math.isinf(high):
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if math.isinf(low):
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def number_tuple(config: object, name: str, length: int, *, positive: bool = False) -> None:
    value = getattr(config, name)
    if not (isinstance(value, tuple) and len(value) == length
            and all(_is_number(v) and math.isfinite(v) and (v > 0 or not positive) for v in value)):
        raise _fail(config, name, f"{length} finite{' positive' if positive else ''} numbers")
