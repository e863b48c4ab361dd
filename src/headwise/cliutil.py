"""How every ``headwise`` command fails: one line on stderr, exit status 2, never a traceback.

Scripts run these commands and grep their errors, so a failure is always a single line
``error: <what was expected, what was given>`` on stderr and exit status 2, and it comes
before the expensive work: an ``--out`` that can never be written is refused before the
analysis or the benchmark, not after it. The pieces:

- :func:`fail` prints one line and exits 2; :func:`reports_errors` wraps a command so that
  a :class:`HeadwiseError` raised anywhere inside it (or an ``OSError`` from a file) takes
  that path; :class:`OneLineErrors` does the same for a whole typer app, and also turns
  click's own usage errors (an unknown option, ``--batch-size abc``) into one line.
- Pre-checks that raise :class:`HeadwiseError` naming the option: :func:`int_in`,
  :func:`out_dir`, :func:`out_file`, :func:`in_file`, :func:`in_dir`, :func:`read_text`.

This module imports only typer/click and headwise.errors, so any command module (the memory
commands too) can use it without pulling in torch.

Example::

    >>> from pathlib import Path
    >>> int_in("--batch-size", 32, 1, 4096)
    32
    >>> int_in("--batch-size", 0, 1, 4096)
    Traceback (most recent call last):
    ...
    headwise.errors.HeadwiseError: --batch-size: expected an integer in [1, 4096], got 0
"""

from __future__ import annotations

import errno
import functools
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

from headwise.errors import HeadwiseError, bad_argument

try:  # recent typer vendors its own click (typer._click): its exceptions are not click's
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - typer before the vendoring uses click itself
    from click import exceptions as _click_errors

_ClickException = _click_errors.ClickException
_UsageError = _click_errors.UsageError


class _NeverError(Exception):
    """Stands for an exception class this click does not have (matches nothing)."""


# A bare group name raises it to print the group's help: that is not a failure to flatten.
_NoArgsIsHelp = getattr(_click_errors, "NoArgsIsHelpError", _NeverError)

F = TypeVar("F", bound=Callable[..., Any])

#: The exit status of every refused command (click uses 2 for usage errors too).
EXIT_STATUS = 2


def one_line(message: object) -> str:
    """``message`` as one line: every run of whitespace (newlines included) becomes a space."""
    return " ".join(str(message).split())


def fail(exc: BaseException | str) -> NoReturn:
    """Print ``error: <exc>`` as one unwrapped line on stderr and exit with status 2."""
    typer.echo(f"error: {one_line(exc)}", err=True)
    raise typer.Exit(EXIT_STATUS)


def _os_error_message(exc: OSError) -> str:
    """``<file>: <reason>`` for an OSError, without Python's ``[Errno n]`` prefix."""
    where = exc.filename if exc.filename is not None else "file"
    return f"{where}: {exc.strerror or exc}"


def reports_errors(command: F) -> F:
    """Wrap a typer command: HeadwiseError, click's errors and OSError become :func:`fail`.

    ``functools.wraps`` keeps the signature (``__wrapped__``), from which typer builds the
    options. A broken pipe (``headwise ... | head``) is left to typer, which exits quietly.
    Any other exception is a bug and keeps its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except HeadwiseError as exc:
            fail(exc)
        except _ClickException as exc:  # typer.BadParameter and friends raised in a command
            fail(exc.format_message())
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise
            fail(_os_error_message(exc))

    return wrapper  # type: ignore[return-value]


class OneLineErrors(TyperGroup):
    """A typer group whose every subcommand fails in one line (``typer.Typer(cls=OneLineErrors)``).

    Subcommands are parsed and run inside the group's ``invoke``, so catching there covers
    click's usage errors (unknown option or command, a value of the wrong type) and any
    HeadwiseError that escaped a command, in nested groups too. A bare group name
    (``headwise bench``) still prints its help.
    """

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _NoArgsIsHelp:
            raise
        except _UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            fail(exc.format_message() + hint)
        except _ClickException as exc:
            fail(exc.format_message())
        except HeadwiseError as exc:
            fail(exc)


# ---------------------------------------------------------------------------------------
# Pre-checks: each raises HeadwiseError naming the option, before any work is done.


def argv_command() -> str:
    """The command line this process was started with, as ``headwise ...`` (quoted for a shell)."""
    return shlex.join(["headwise", *sys.argv[1:]])


def int_in(name: str, value: int, lo: int, hi: int) -> int:
    """``value`` if it is an integer in [lo, hi]; the bounds say why in the option's help."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad_argument(name, f"an integer in [{lo}, {hi}]", value)
    return value


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the current directory at worst)."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def out_dir(path: Path, name: str = "--out") -> Path:
    """``path`` if it is a directory that exists or can be created and written into.

    Nothing is created: a command that is then refused for another reason leaves no empty
    directory behind. Refused: an existing regular file, a path inside a file, a directory
    this process may not write into.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise bad_argument(name, "a directory (existing or new)", f"{path}, which is a file")
    anchor = _first_existing(path)
    if not anchor.is_dir():
        raise bad_argument(name, "a directory (existing or new)", f"{path}, inside the file {anchor}")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise bad_argument(name, "a directory this user may write into", f"{path} ({anchor} is not writable)")
    return path


def out_file(path: Path, name: str = "--out") -> Path:
    """``path`` if it names a file that can be (re)written: not a directory, its folder writable."""
    path = Path(path)
    if path.is_dir():
        raise bad_argument(name, "a file path", f"{path}, which is a directory")
    if path.exists() and not path.is_file():
        raise bad_argument(name, "a regular file", f"{path}, which is not one")
    out_dir(path.parent, name)
    return path


def in_file(path: Path, name: str) -> Path:
    """``path`` if it is an existing regular file this process may read."""
    path = Path(path)
    if not path.exists():
        raise bad_argument(name, "an existing file", f"{path}, which does not exist")
    if not path.is_file():
        raise bad_argument(name, "a regular file", f"{path}, which is a directory" if path.is_dir() else str(path))
    if not os.access(path, os.R_OK):
        raise bad_argument(name, "a readable file", f"{path} (permission denied)")
    return path


def in_dir(path: Path, name: str) -> Path:
    """``path`` if it is an existing directory."""
    path = Path(path)
    if not path.is_dir():
        got = f"{path}, which is a file" if path.exists() else f"{path}, which does not exist"
        raise bad_argument(name, "an existing directory", got)
    return path


def read_text(path: Path, name: str) -> str:
    """The UTF-8 text of ``path``; a binary file (a NUL byte) or invalid UTF-8 is refused.

    Checked on the bytes, so the message can say where the file stops being text.
    """
    raw = in_file(path, name).read_bytes()
    nul = raw.find(b"\0")
    if nul >= 0:
        raise bad_argument(name, "a UTF-8 text file", f"binary data in {path} (a NUL byte at offset {nul})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_argument(
            name, "a UTF-8 text file", f"bytes that are not UTF-8 in {path} at offset {exc.start}"
        ) from None
