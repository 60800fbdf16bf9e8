"""Checks of single config fields, each failing with the field, the value and what is allowed.

The typed config views (`models.ModelConfig`, `data.DataConfig`, `experiment.config`) check
every field with these, so that all messages read alike:

    config.optim.learning_rate = -0.001: must be a finite number > 0.

`path` is the field's dotted name under `config` ("optim.learning_rate").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ddpm_jax.errors import ConfigError


def fail(path: str, value: Any, allowed: str) -> ConfigError:
    """The `ConfigError` for `config.<path> = value`, which `allowed` says how to fix."""
    return ConfigError(f"config.{path} = {value!r}: {allowed}")


def is_int(value: Any) -> bool:
    """True for an integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def integer(
    path: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    *,
    none_ok: bool = False,
    hint: str = "",
) -> int | None:
    """`value` as an int within [low, high] (either bound optional), or None if `none_ok`."""
    if value is None and none_ok:
        return None
    in_range = is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not in_range:
        bounds = _bounds(low, high, False, False)
        what = f"an integer {bounds}" if bounds else "an integer"
        raise fail(path, value, f"must be {what}{' or None' if none_ok else ''}.{hint}")
    return int(value)


def number(
    path: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    none_ok: bool = False,
    hint: str = "",
) -> float | None:
    """`value` as a finite float within the bounds (open or closed), or None if `none_ok`."""
    if value is None and none_ok:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v)
        ok = ok and (low is None or (v > low if low_open else v >= low))
        ok = ok and (high is None or (v < high if high_open else v <= high))
    if not ok:
        bounds = _bounds(low, high, low_open, high_open)
        what = f"a finite number {bounds}" if bounds else "a finite number"
        raise fail(path, value, f"must be {what}{' or None' if none_ok else ''}.{hint}")
    return float(value)


def boolean(path: str, value: Any) -> bool:
    """`value` if it is a bool (True/False; 0 and 1 are not accepted)."""
    if not isinstance(value, bool):
        raise fail(path, value, "must be True or False.")
    return value


def choice(path: str, value: Any, allowed: Sequence[Any], *, hint: str = "") -> Any:
    """`value` if it is one of `allowed`."""
    if value not in tuple(allowed):
        listed = ", ".join(repr(a) for a in allowed)
        raise fail(path, value, f"must be one of {listed}.{hint}")
    return value


def string(path: str, value: Any, *, none_ok: bool = False, hint: str = "") -> str | None:
    """`value` if it is a non-empty string (or None if `none_ok`)."""
    if value is None and none_ok:
        return None
    if not isinstance(value, str) or not value.strip():
        what = "a non-empty string" + (" or None" if none_ok else "")
        raise fail(path, value, f"must be {what}.{hint}")
    return value


def int_tuple(path: str, value: Any, low: int | None = None, *, nonempty: bool = True) -> tuple:
    """`value` (a list or tuple of integers, each >= low) as a tuple."""
    ok = isinstance(value, Sequence) and not isinstance(value, str)
    ok = ok and all(is_int(v) and (low is None or v >= low) for v in value)
    ok = ok and (len(value) > 0 or not nonempty)
    if not ok:
        each = f" each >= {low}" if low is not None else ""
        empty = "a non-empty" if nonempty else "a"
        raise fail(path, value, f"must be {empty} tuple of integers{each}.")
    return tuple(int(v) for v in value)


def number_tuple(
    path: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    nonempty: bool = True,
    hint: str = "",
) -> tuple[float, ...]:
    """`value` (a list or tuple of finite numbers, each within the bounds) as a tuple of floats."""
    ok = isinstance(value, Sequence) and not isinstance(value, str)
    ok = ok and (len(value) > 0 or not nonempty)
    if ok:
        try:
            for v in value:
                number(path, v, low, high, low_open=low_open, high_open=high_open)
        except ConfigError:
            ok = False
    if not ok:
        bounds = _bounds(low, high, low_open, high_open)
        each = f", each {bounds}" if bounds else ""
        empty = "a non-empty" if nonempty else "a"
        raise fail(path, value, f"must be {empty} tuple of finite numbers{each}.{hint}")
    return tuple(float(v) for v in value)


# A name that is one file or directory name on any file system, and never hidden.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


def file_name(path: str, value: Any, *, none_ok: bool = False, hint: str = "") -> str | None:
    """`value` if it can name one file or directory: letters, digits and `_ . + = -`, not
    starting with a dot (or None if `none_ok`)."""
    if value is None and none_ok:
        return None
    if not isinstance(value, str) or not _FILE_NAME.fullmatch(value):
        what = "a name of letters, digits and _.+=- (not starting with . or -)"
        raise fail(path, value, f"must be {what}{' or None' if none_ok else ''}.{hint}")
    return value


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def sha256(path: str, value: Any) -> str | None:
    """`value` if it is None or a SHA-256 digest written as 64 hexadecimal digits."""
    if value is None:
        return None
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise fail(path, value, "must be None or a SHA-256 digest (64 hexadecimal digits).")
    return value.lower()


# Where every field of every group is defined, with its default and what it means.
DEFAULTS_FILE = "ddpm_jax/experiment/defaults.py"


def unknown_fields(group: str, given: Sequence[str], known: Sequence[str]) -> None:
    """Raises naming the fields of `config.<group>` that are not among `known`."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(
            f"config.{group} has unknown field(s) {unknown}; the known fields are "
            f"{sorted(known)} ({DEFAULTS_FILE} documents each)."
        )


def group_values(config: Any, group: str) -> dict[str, Any]:
    """The fields of `config.<group>` as a plain dict (config: a ConfigDict or a mapping)."""
    if not isinstance(config, Mapping) and not hasattr(config, "keys"):
        raise ConfigError(
            f"a config must be an ml_collections ConfigDict of groups, got "
            f"{type(config).__name__}; start from get_config() of {DEFAULTS_FILE}."
        )
    if group not in config.keys():
        raise ConfigError(
            f"config has no group {group!r} (it has {sorted(config.keys())}); every config "
            f"starts from get_config() of {DEFAULTS_FILE}, which defines all the groups."
        )
    value = config[group]
    if not isinstance(value, Mapping) and not hasattr(value, "to_dict"):
        raise ConfigError(f"config.{group} must be a group of fields, got {value!r}.")
    return dict(value.to_dict() if hasattr(value, "to_dict") else value)


def view_of_group(cls: type, group: str, values: Mapping[str, Any], **given: Any) -> Any:
    """The frozen view `cls(**values, **given)` of `config.<group>`, every field checked.

    The views state no defaults (`defaults.py` is the one source): each field of `cls` not
    in `given` (those come from another group) must be in `values`, and no other may be.

    Raises:
      ConfigError: unknown or missing fields, or a bad value (from the view's own checks).
    """
    names = [f.name for f in dataclasses.fields(cls) if f.name not in given]
    unknown_fields(group, list(values), names)
    missing = [k for k in names if k not in values]
    if missing:
        raise ConfigError(
            f"config.{group} is missing field(s) {missing}; start from get_config() of "
            f"{DEFAULTS_FILE}, which defines every field."
        )
    return cls(**values, **given)
