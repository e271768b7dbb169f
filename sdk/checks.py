"""The argument checks every checking module shares, numbers, names and arrays: `is_int` / `int_in` for
counts and ids (`INT32_MAX`, the largest count the native library's int fields hold), `finite_float32` /
`positive_in_float32` / `FLOAT32_MAX` for what it reads as float32, `one_of` for a name from a fixed
set, `array_of` / `refuse_masked` for arrays, and the CRF parameters every front end shares:
`check_iterations`, `check_normalization`, `check_threads` (the numpy and torch dense CRFs, the
exported node's attributes, `Segmenter`, `dynseg demo`). Each failure is an InvalidArgumentError that names the
argument. numpy only: the SDK imports it without torch.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, TypeGuard, get_args

import numpy as np

from .errors import InvalidArgumentError

__all__ = ["FLOAT32_MAX", "INT32_MAX", "Normalization", "array_of", "check_iterations", "check_normalization",
           "check_threads", "finite_float32", "int_in", "is_int", "one_of", "positive_in_float32", "refuse_masked"]

FLOAT32_MAX = float(np.finfo(np.float32).max)
# The largest count (iterations, threads) the C structs' int fields hold, and the CUDA kernels' index range
INT32_MAX = 2**31 - 1
# The mean field's normalisations (docs/crf.md): "after" is CRF-as-RNN's and the paper's, "symmetric" pydensecrf's
Normalization = Literal["after", "symmetric"]


def is_int(value: object, *, numpy: bool = True) -> TypeGuard[int | np.integer]:
    """Whether `value` is an int and not a bool: True is an int to isinstance, and JSON's true parses as
    one, but no count or id is ever True. numpy=False refuses numpy's integers too, for values that are
    written to JSON as they are (json cannot write np.int64)."""
    kinds = (int, np.integer) if numpy else int
    return isinstance(value, kinds) and not isinstance(value, (bool, np.bool_))


def one_of(name: str, value: object, allowed: Iterable[str]) -> str:
    """`value` when it is one of the names `allowed`, else InvalidArgumentError "{name} must be one of
    a, b, c, got {value!r}"."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def int_in(name: str, value: object, low: int, high: int | None = None, *, rule: str | None = None) -> int:
    """`value` as a Python int when it is an int (numpy's too, not a bool) in low..high (high None: no
    upper bound), else InvalidArgumentError "{name} must be {rule}, got {value!r}". rule defaults to
    "an int in low..high" given a high, else "a non-negative int" (low 0), "a positive int" (low 1) or
    "an int >= low"."""
    if rule is None:
        rule = (f"an int in {low}..{high}" if high is not None else
                {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}"))
    if not is_int(value) or value < low or (high is not None and value > high):
        raise InvalidArgumentError(f"{name} must be {rule}, got {value!r}")
    return int(value)


def array_of(name: str, value: object) -> np.ndarray:
    """`value` as a numpy array, or InvalidArgumentError naming `name` for None, for a masked array (its
    mask would be dropped without a word) and for what numpy cannot read."""
    if value is None:
        raise InvalidArgumentError(f"{name} must be given, got None")
    refuse_masked(name, value)
    try:
        return np.asarray(value)
    except MemoryError:  # the machine's, not the value's
        raise
    except Exception as error:  # ragged lists, foreign __array__ implementations
        raise InvalidArgumentError(f"{name} could not be read as an array: {error}") from error


def refuse_masked(name: str, value: object) -> None:
    if isinstance(value, np.ma.MaskedArray):
        raise InvalidArgumentError(f"{name} must not be a masked array: dynseg would ignore its mask; "
                                   f"pass {name}.filled(...) with the value masked entries should take")


def positive_in_float32(number: float) -> bool:
    """Whether `number` stays > 0 as the float32 the native library reads: 2**-150 and less round to 0.
    Plain float arithmetic, no numpy, so that torch.compile traces it."""
    return number > 2.0**-150


def finite_float32(value: object) -> float | None:
    """`value` as a float when it is a real number (an int or a float, numpy's too, not a bool) that
    float32 holds finitely, within ±FLOAT32_MAX, else None. An int beyond float64 (JSON's integers are
    unbounded) is None too."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and abs(number) <= FLOAT32_MAX else None


def check_iterations(iterations: object, name: str = "iterations") -> int:
    """The mean-field iteration count T as an int in 0..INT32_MAX (the C struct's int32 field)."""
    return int_in(name, iterations, 0, INT32_MAX)


def check_normalization(normalization: object, name: str = "normalization") -> Normalization:
    """The normalisation, 'after' or 'symmetric', as a plain str (whatever str subclass came)."""
    for known in get_args(Normalization):
        if isinstance(normalization, str) and normalization == known:
            return known
    raise InvalidArgumentError(f"{name} must be 'after' or 'symmetric', got {normalization!r}")


def check_threads(threads: object) -> int:
    """The CPU kernels' thread count: an int in 1..INT32_MAX, or None for every core (returned as 0, the
    native library's "every core")."""
    if threads is None:
        return 0
    return int_in("threads", threads, 1, INT32_MAX, rule=f"None or an int in 1..{INT32_MAX}")
