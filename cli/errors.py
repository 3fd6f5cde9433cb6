"""The CLI's one error convention, applied to every command by :class:`App`.

- :class:`~kcs_lens.errors.KcsLensError` (bad input or state): its message as one ``error:`` line
  on stderr, exit code 2.
- Anything else is a bug: one line naming the exception and a log file holding the traceback,
  exit code 1. ``kcs-lens --debug ...`` (or ``KCS_LENS_DEBUG=1``) lets the traceback through.
"""

import datetime
import functools
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import typer

from kcs_lens.errors import KcsLensError

EXIT_BAD_INPUT = 2
EXIT_BUG = 1
F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get("KCS_LENS_DEBUG", "").lower() in ("1", "true", "yes")


def fail(message: str) -> NoReturn:
    """One ``error:`` line on stderr, exit code 2."""
    first = message.strip().splitlines()[0] if message.strip() else "bad input"
    typer.echo(f"error: {first}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def log_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kcs-lens" / "logs"


def write_crash_log(exc: BaseException) -> Path:
    """The traceback of an unexpected exception in a new log file (a temp dir if the cache is not writable)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    for d in (log_dir(), Path(tempfile.gettempdir())):
        try:
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"kcs-lens-{stamp}-{os.getpid()}.log"
            path.write_text(text)
            return path
        except OSError:
            continue
    raise exc


def guarded(fn: F) -> F:
    """Run a command under the error convention above."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KcsLensError as e:
            fail(str(e))
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            if debug_enabled():
                raise
            log = write_crash_log(e)
            typer.echo(
                f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                f"(a bug in kcs-lens; traceback in {log}; rerun with --debug to see it here)",
                err=True,
            )
            raise typer.Exit(EXIT_BUG) from None

    return run  # type: ignore[return-value]


class App(typer.Typer):
    """A Typer app whose commands all run under :func:`guarded`. Help is plain click text (rich's
    help panels truncate long flags and words when there is no terminal)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("rich_markup_mode", None)
        kwargs.setdefault("context_settings", {"max_content_width": 120})
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:  # type: ignore[override]
        register = super().command(*args, **kwargs)

        def decorator(fn: F) -> F:
            register(guarded(fn))
            return fn

        return decorator
