"""Type and range checks shared by longkit's public entry points (config dataclasses, masks, the CLI).

Each check returns the value normalised to a plain Python type (``numpy.int64(3)`` -> ``3``) and raises with a
message naming the field, the bad value (and its type) and what to pass instead. Booleans are never numbers
here: ``True`` is an ``int`` to Python, but ``n_global=True`` is a mistake, not ``n_global=1``.

Config classes raise :class:`~longkit.errors.ConfigError` for both wrong types and bad ranges (the default
``errors=CONFIG``); plain-API objects such as attention masks raise ``TypeError``/``ValueError`` (``BUILTIN``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, NamedTuple

from .errors import ConfigError

__all__ = ["Errors", "CONFIG", "BUILTIN", "describe", "check_int", "check_number", "check_bool", "check_choice"]


class Errors(NamedTuple):
    """Exception classes raised for a wrong type and for a value out of range."""

    type: type[Exception]
    value: type[Exception]


CONFIG = Errors(ConfigError, ConfigError)
BUILTIN = Errors(TypeError, ValueError)


def describe(value: Any) -> str:  # noqa: ANN401
    """``repr(value)`` plus its type, so ``'2'`` (a str) and ``2`` read differently in a message."""
    return f"{value!r} ({type(value).__name__})"


def _label(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def _fail(exc: type[Exception], owner: str, name: str, want: str, value: Any, hint: str = "") -> Exception:  # noqa: ANN401
    tail = f"; {hint}" if hint else ""
    return exc(f"{_label(owner, name)} must be {want}, got {describe(value)}{tail}")


def _range_text(kind: str, lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in [{lo}, {hi}]"
    if lo is not None:
        return f"{kind} >= {lo}"
    if hi is not None:
        return f"{kind} <= {hi}"
    return kind


def _type_hint(value: Any, convert: str) -> str:  # noqa: ANN401
    """What to do about a value of the wrong type (the common mistakes: a bool, a string, a float)."""
    if isinstance(value, bool):
        return "a bool is not a number here: pass the number itself"
    if isinstance(value, str):
        return f"convert the string first, e.g. {convert}(value)"
    if isinstance(value, float) and convert == "int":
        return "pass a whole number (an int), not a float"
    if hasattr(value, "item"):  # a tensor or array element
        return f"pass a Python number, e.g. {convert}(value.item())"
    return ""


def check_int(owner: str, name: str, value: Any, *, min: int | None = None, max: int | None = None,  # noqa: ANN401
              allow_none: bool = False, want: str | None = None, errors: Errors = CONFIG) -> int | None:
    """``value`` as an ``int`` within ``[min, max]`` (or ``None`` if ``allow_none``); bools and floats are rejected.

    ``want`` replaces the generated description (``"an int >= 1 or None"``) in the message.
    """
    if value is None and allow_none:
        return None
    text = want or (_range_text("an int", min, max) + (" or None" if allow_none else ""))
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(errors.type, owner, name, text, value, _type_hint(value, "int"))
    value = int(value)
    if (min is not None and value < min) or (max is not None and value > max):
        raise _fail(errors.value, owner, name, text, value)
    return value


def check_number(owner: str, name: str, value: Any, *, min: float | None = None, max: float | None = None,  # noqa: ANN401
                 min_exclusive: bool = False, want: str | None = None, errors: Errors = CONFIG) -> float:
    """``value`` as a finite ``float`` in ``[min, max]`` (``(min, max]`` if ``min_exclusive``); bools, strings,
    NaN and infinities are rejected."""
    if want is None:
        want = _range_text("a number", min, max)
        if min_exclusive and min is not None:
            want = want.replace(f">= {min}", f"> {min}").replace(f"[{min},", f"({min},")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(errors.type, owner, name, want, value, _type_hint(value, "float"))
    value = float(value)
    if not math.isfinite(value):
        raise _fail(errors.value, owner, name, want, value, "NaN and infinities are not accepted")
    below = min is not None and (value <= min if min_exclusive else value < min)
    if below or (max is not None and value > max):
        raise _fail(errors.value, owner, name, want, value)
    return value


def check_bool(owner: str, name: str, value: Any, *, want: str = "a bool (True or False)",  # noqa: ANN401
               errors: Errors = CONFIG) -> bool:
    """``value`` itself if it is a real ``bool``: ``"no"``, ``0`` or ``1`` are rejected, not read as truth values."""
    if not isinstance(value, bool):
        hint = "a string is not read as a truth value" if isinstance(value, str) else ""
        raise _fail(errors.type, owner, name, want, value, hint)
    return value


def _same_kind(value: Any, choice: Any) -> bool:  # noqa: ANN401
    # bool is an int subclass: True must not match a choice of 1 (nor 1 a choice of True).
    if isinstance(value, bool) or isinstance(choice, bool):
        return type(value) is type(choice)
    return isinstance(value, type(choice))


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any], *,  # noqa: ANN401
                 errors: Errors = CONFIG) -> Any:  # noqa: ANN401
    """``value`` if it is one of ``choices`` (compared by type and value, so ``1`` does not match ``True``)."""
    options = list(choices)
    if not any(_same_kind(value, c) and value == c for c in options):
        raise _fail(errors.value, owner, name, f"one of {options}", value)
    return value


def check_kv_codebook(owner: str, options: Any) -> None:  # noqa: ANN401
    """The quantized-KV ``codebook`` option against the others (``KVQuantSpec`` and ``KVCacheConfig`` alike)."""
    check_bool(owner, "codebook", options.codebook)
    if options.codebook and options.key_axis == "channel":
        raise ConfigError(f"{owner}: codebook=True scales each token's groups by their RMS; key_axis='channel' "
                          "(KIVI) uses min/max scales over token groups: use key_axis='token' or codebook=False")
    if options.codebook and options.key_bits == 16 and options.value_bits == 16:
        raise ConfigError(f"{owner}: codebook=True but key_bits=value_bits=16 quantize nothing: use 2, 3 or 4 "
                          "bits for keys or values, or codebook=False")
