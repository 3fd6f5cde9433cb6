"""The CLI's one error convention, applied to every command by :class:`App`.

- :class:`~kcs_lens.errors.KcsLensError` (bad input or state), an ``OSError`` (disk full, no
  permission) or a bad flag value (click's usage errors): one ``error:`` line on stderr, exit code 2.
- :class:`~kcs_lens.errors.KcsLensWarning`: one ``note:`` line on stderr; the command goes on.
- Ctrl-C (outside discovery, which saves its state and says how to resume): one ``error:`` line,
  exit code 130.
- Anything else is a bug: one line naming the exception and a log file holding the traceback,
  exit code 1. ``kcs-lens --debug ...`` (or ``KCS_LENS_DEBUG=1``) lets the traceback through.
"""

import datetime
import functools
import os
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

from kcs_lens.errors import KcsLensError, KcsLensWarning

EXIT_BAD_INPUT = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
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
            with warnings.catch_warnings():
                warnings.simplefilter("always", KcsLensWarning)
                warnings.showwarning = _show_note
                return fn(*args, **kwargs)
        except KcsLensError as e:
            fail(str(e))
        except BrokenPipeError:  # `kcs-lens kg show | head`: Typer exits quietly
            raise
        except OSError as e:  # the environment, not a bug: disk full, permissions, a vanished file
            where = f"{e.filename}: " if e.filename else ""
            fail(f"{where}{e.strerror or e}")
        except KeyboardInterrupt:  # Ctrl-C outside discovery's own handling (loading a model, reading data)
            typer.echo("error: interrupted (Ctrl-C); no file was left half-written", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (typer.Exit, typer.Abort, SystemExit):
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


def _show_note(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    if isinstance(category, type) and issubclass(category, KcsLensWarning):
        typer.echo(f"note: {message}", err=True)
    else:
        warnings._showwarnmsg_impl(warnings.WarningMessage(message, category, filename, lineno, file, line))  # type: ignore[attr-defined]


# click's UsageError as Typer uses it (Typer >= 0.20 vendors its own click): BadParameter's base.
UsageError: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class OneLineUsageError(UsageError):
    """A bad flag or argument (click's parsing and range checks) shown as one ``error:`` line."""

    def show(self, file: Any = None) -> None:
        where = f" (see: {self.ctx.command_path} --help)" if self.ctx is not None else ""
        typer.echo(f"error: {self.format_message()}{where}", err=True)


class OneLineErrorGroup(TyperGroup):
    """The app's command group: usage errors of every command below it become one line."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as e:
            raise _one_line(e) from None


def _one_line(e: UsageError) -> UsageError:
    if isinstance(e, OneLineUsageError):
        return e
    return OneLineUsageError(" ".join(e.format_message().split()), e.ctx)


class App(typer.Typer):
    """A Typer app whose commands all run under :func:`guarded`. Help is plain click text (rich's
    help panels truncate long flags and words when there is no terminal)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("rich_markup_mode", None)
        kwargs.setdefault("cls", OneLineErrorGroup)
        kwargs.setdefault("context_settings", {"max_content_width": 120})
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:  # type: ignore[override]
        register = super().command(*args, **kwargs)

        def decorator(fn: F) -> F:
            register(guarded(fn))
            return fn

        return decorator
