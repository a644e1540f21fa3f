"""How the ``ldm`` command reports a failure: expected errors as one line and an exit status, the rest as a traceback.

Expected errors are what a user's input causes and the message explains: ``ValueError`` (bad values, files and
configs; our ``ConfigError``, ``BadImageError``, ``NonFiniteOutputError`` are ones), the "no such file" family of
``OSError``, Lightning's ``MisconfigurationException`` and every exception class defined in ``ldm`` itself. They
print ``ldm CMD: error: MESSAGE`` on one line and exit with 2 when the command line or config is wrong (parsing,
building the model and data from it) or 1 when the run failed. ``--debug`` (or ``LDM_DEBUG=1``) re-raises them with
the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_RUNTIME = 1
EXIT_USAGE = 2
_EXPECTED = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
_EXPECTED_BY_NAME = ("MisconfigurationException",)  # Lightning's, named to keep Lightning out of the inference CLI


class UsageError(ValueError):
    """The command line or config is wrong (exit status 2); raised with the real cause chained."""


def is_expected(exc: BaseException) -> bool:
    """Whether ``exc`` is an error the user can fix from its message alone."""
    return (isinstance(exc, _EXPECTED) or type(exc).__module__.split(".")[0] == "ldm"
            or any(cls.__name__ in _EXPECTED_BY_NAME for cls in type(exc).__mro__))


def root_cause(exc: BaseException) -> BaseException:
    """``exc``, or the error it was raised from when ``exc`` is a wrapper jsonargparse raised (it wraps a model's
    ``ValueError`` in "Does not validate against any of the Union subtypes" and a dump of the whole config)."""
    seen = set()
    while _raised_by_jsonargparse(exc) and exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def _raised_by_jsonargparse(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("jsonargparse")


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (a ``KeyError``'s without its quotes)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def pop_debug(args: list[str]) -> bool:
    """Remove ``--debug`` from ``args``; whether it or ``LDM_DEBUG=1`` asks for tracebacks."""
    debug = "--debug" in args
    while "--debug" in args:
        args.remove("--debug")
    return debug or os.environ.get("LDM_DEBUG", "") not in ("", "0")


def run_reporting_errors(command: str, run: Callable[[], None], debug: bool) -> None:
    """Run ``run``; turn an expected error into a one-line message on stderr and ``SystemExit`` 1 or 2."""
    try:
        run()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"ldm {command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001  (sorted below: only expected errors lose their traceback)
        cause = root_cause(exc)
        if debug or not is_expected(cause):
            raise
        status = EXIT_USAGE if isinstance(exc, UsageError) else EXIT_RUNTIME
        name = "" if type(cause) in (ValueError, UsageError) else f"{type(cause).__name__}: "
        print(f"ldm {command}: error: {name}{one_line(cause)} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(status) from None
