"""Command-line help from the typed configs: the docstring under each dataclass field becomes its
--help text (klong.Config and factory.FactoryConfig), so the documentation of a knob lives in one
place, beside the knob (docs/STYLE.md, practice 3). Also the user-error convention of every CLI
(issue 21): bad input is one line on stderr and exit status 2 (`UserError`, `Parser`, `run`)."""
from __future__ import annotations

import argparse
import ast
import errno
import inspect
import sys


def field_docs(cls) -> dict[str, str]:
    """{field name: the string literal right under it, whitespace collapsed} for a dataclass."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


# ----------------------------------------------------------------------------- user errors

class UserError(Exception):
    """Bad input from the user (a file, a flag, a folder): the CLIs print it as one line on
    stderr and exit with status 2 (`run`), never a traceback unless --debug."""


USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS,
               errno.ENOTDIR, errno.EISDIR, errno.EDQUOT, errno.EEXIST}
"""OSErrors that mean the user's input or machine is at fault (missing file, unwritable folder,
full disk), not the program: reported like UserError."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad flag raises UserError instead of printing the usage
    and exiting, so `run` reports it like any other user error (exit 2)."""

    def error(self, message: str):
        raise UserError(message)


def one_line(e: BaseException) -> str:
    """The error as one line: an OSError as `FILE: what went wrong`, anything else its message
    with newlines folded."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def is_user_error(e: BaseException, user_errors: tuple = ()) -> bool:
    return isinstance(e, (UserError, *user_errors)) or (
        isinstance(e, OSError) and e.errno in USER_ERRNOS)


def run(main, argv=None, user_errors: tuple = (), prog: str = "") -> int:
    """Run `main(argv)` as a command: a user error (UserError, the `user_errors` types, an
    OSError of USER_ERRNOS) prints `PROG: error: ONE LINE` on stderr and returns 2; `--debug`
    anywhere in argv re-raises it with its traceback instead. Anything else is a bug and keeps
    its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except BaseException as e:              # noqa: B902 -- filtered just below
        if debug or not is_user_error(e, user_errors):
            raise
        _close_progress_bars()
        print(f"{prog + ': ' if prog else ''}error: {one_line(e)}", file=sys.stderr)
        return 2


def _close_progress_bars() -> None:
    """End any open tqdm bar's line, so the error is a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
        bar.close()
