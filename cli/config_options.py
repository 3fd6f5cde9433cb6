"""Command flags generated from a typed settings class (:mod:`kcs_lens.settings`): one option per
field with the field's help text and default, each defaulting to None ('not given', so that a
config file or the library's defaults decide); beside them a command's positional argument and its
own option table (:func:`argument`, :func:`option_parameters`)."""

import inspect
import types
import typing
from dataclasses import fields
from typing import Any, Callable, Optional, get_args, get_origin

import typer

from kcs_lens.settings import field_default, field_types, flag_of


def _cli_type(tp: Any) -> Any:
    """The click-level type of a field: str for lists (comma list) and Literals."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in get_args(tp) if a is not type(None))
    if get_origin(tp) in (list, typing.Literal):
        return str
    return tp


def _default_note(cls: type, name: str) -> str:
    d = field_default(cls, name)
    if isinstance(d, list):
        d = ",".join(map(str, d))
    return "" if d is None or d == "" or isinstance(d, bool) else f" [default: {d}]"


def config_parameters(
    cls: type, skip: tuple[str, ...] = (), default_note: Callable[[str], str] | None = None
) -> list[inspect.Parameter]:
    """One keyword parameter (a Typer option defaulting to None: 'not given') per field of ``cls``;
    ``default_note(name)``: how the help shows a field's default (else ``[default: ...]``)."""
    params = []
    tps = field_types(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        decl = f.metadata.get("flag") or flag_of(f.name)
        note = default_note(f.name) if default_note else _default_note(cls, f.name)
        option = typer.Option(None, decl, help=f.metadata["help"] + note, show_default=False)
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[_cli_type(tps[f.name])])
        )
    return params


def argument(name: str, annotation: Any, help: str) -> inspect.Parameter:
    """A required positional argument of a command whose signature is generated."""
    return inspect.Parameter(
        name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=typer.Argument(..., help=help), annotation=annotation
    )


def option_parameters(table: dict[str, tuple[Any, Any]]) -> list[inspect.Parameter]:
    """One keyword parameter per entry ``name: (annotation, typer.Option(...))`` of a command's own
    option table (the options that are not settings fields)."""
    return [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=o, annotation=t) for k, (t, o) in table.items()]


def with_parameters(fn: Callable[..., Any], params: list[inspect.Parameter]) -> Callable[..., Any]:
    """``fn`` (taking ``**kw``) with the signature Typer reads its options from."""
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return fn


def given(kw: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave (not None)."""
    return {k: v for k, v in kw.items() if v is not None}
