"""Typed settings, the one way every command declares its options (SAELens-style: config ->
runner -> saved artifact). A settings class is a dataclass whose fields are made with :func:`opt`:
default, help text, constraint and (for booleans) the CLI flag pair. Allowed values are declared
one way, as ``Literal`` types (aliases of old names in ``opt(aliases=...)``).

:func:`build` makes an instance from option values (types and allowed values checked, naming
the option); :func:`check_value` checks one value against its field (type, constraint) naming the option;
:func:`validate_fields` checks every field of an instance. The CLI builds each command's flags
from the fields (cli/config_options.py).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin

from kcs_lens.errors import ConfigError

T = TypeVar("T")

# --- constraints: each returns None when the value is fine, else what it must be ------------
Check = Callable[[Any], "str | None"]
MAX_INT = 2**31 - 1  # counts beyond this are meaningless (and overflow int32 tensors)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def positive(x: Any) -> str | None:
    return None if _finite(x) and x > 0 else "a finite number > 0"


def non_negative(x: Any) -> str | None:
    return None if _finite(x) and x >= 0 else "a finite number >= 0"


def in_range(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> Check:
    lb, rb = "(" if open_lo else "[", ")" if open_hi else "]"

    def check(x: Any) -> str | None:
        ok = _finite(x) and (x > lo if open_lo else x >= lo) and (x < hi if open_hi else x <= hi)
        return None if ok else f"a number in {lb}{lo}, {hi}{rb}"

    return check


def int_at_least(lo: int) -> Check:
    """An integer count in [lo, MAX_INT]."""
    return lambda x: None if _finite(x) and lo <= x <= MAX_INT else f"an integer in [{lo}, {MAX_INT}]"


def seed_range(x: Any) -> str | None:
    return None if isinstance(x, int) and 0 <= x < 2**63 else "an integer in [0, 2^63)"


def torch_device(x: Any) -> str | None:
    """A device name torch understands (whether it is present here is checked when the model loads)."""
    import torch

    try:
        torch.device(x)
    except (RuntimeError, TypeError, ValueError):
        return "a torch device name such as cpu, cuda, cuda:1 or mps"
    return None


def non_empty(x: Any) -> str | None:
    return None if isinstance(x, str) and x.strip() else "a non-empty string"


def opt(
    default: Any,
    help: str,
    *,
    check: Check | None = None,
    flag: str | None = None,
    factory: Any = None,
    aliases: dict[str, str] | None = None,
) -> Any:
    """A settings field with its help text, its constraint, (for booleans) its CLI flag pair and
    (for choices) the old names still accepted."""
    meta = {"help": help, "check": check, "flag": flag, "aliases": aliases or {}}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --- fields of a settings class ------------------------------------------------------------
def field_map(cls: type) -> dict[str, Field]:
    return {f.name: f for f in fields(cls)}


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_default(cls: type, name: str) -> Any:
    f = field_map(cls)[name]
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc,operator]


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_name(f: Field) -> str:
    """The option a field is set by: its flag (the first of a ``--x/--no-x`` pair), else ``--field-name``."""
    flag = f.metadata.get("flag")
    return flag.split("/")[0] if flag else flag_of(f.name)


def show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return ", ".join(str(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " or null"
    if get_origin(tp) is list:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, *, where: str) -> Any:
    """``value`` as the type ``tp`` (ints for floats, a comma string for a list), or a ConfigError
    naming ``where`` (the option or the config file key) and the expected type."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        return coerce(value, inner[0], where=where)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where} {show(value)}: expected one of {_type_name(tp)}")
    if origin is list:
        if isinstance(value, str):
            value = [x.strip() for x in value.split(",") if x.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
            return list(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where} {show(value)}: expected {_type_name(tp)}, got {type(value).__name__}")


def check_value(cls: type, name: str, value: Any, *, where: str) -> Any:
    """One value of field ``name`` of ``cls`` checked on its own (old aliases mapped, type, allowed
    values, constraint); errors name ``where``. Returns the coerced value."""
    fm = field_map(cls)
    if name not in fm:
        raise ConfigError(f"{where}: unknown setting {name!r}; valid settings are {sorted(fm)}")
    value = fm[name].metadata.get("aliases", {}).get(value, value) if isinstance(value, str) else value
    v = coerce(value, field_types(cls)[name], where=where)
    check = fm[name].metadata.get("check")
    bad = check(v) if check is not None and v is not None else None
    if bad:
        raise ConfigError(f"{where} {show(v)}: must be {bad}")
    return v


def validate_fields(obj: Any) -> None:
    """Check (and coerce) every field of a settings instance, naming the option."""
    for f in fields(obj):
        setattr(obj, f.name, check_value(type(obj), f.name, getattr(obj, f.name), where=option_name(f)))


def build(cls: type[T], values: dict[str, Any]) -> T:
    """An instance of the settings class ``cls`` from option values (a flag's string, a config file's
    value): unknown options and values of the wrong type or not allowed are ConfigErrors naming the
    option; the constraints are checked by the instance's ``validate()``."""
    fm, types_ = field_map(cls), field_types(cls)
    unknown = sorted(set(values) - set(fm))
    if unknown:
        raise ConfigError(f"unknown options {unknown}; valid options are {sorted(fm)}")
    out = {}
    for k, v in values.items():
        v = fm[k].metadata.get("aliases", {}).get(v, v) if isinstance(v, str) else v
        out[k] = coerce(v, types_[k], where=option_name(fm[k]))
    return cls(**out)
