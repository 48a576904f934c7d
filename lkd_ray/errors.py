"""The one place where a failure the user can act on becomes one console line and an exit code.

Every command (``python -m lkd_ray …``, ``jobs/*.py``) reports through ``user_errors`` / ``explain``. A failure is
classified by the *type* of what was raised (or of what it wraps: ``raise … from``, Ray's task wrapper, Ray Train's
worker and controller failures), never by its text:

    exit 2  InputError      bad input: config, data, labels, teacher, loss network to start from, run name
    exit 3  StorageFailure  storage unreachable or refusing (ours, or Ray Train's checkpoints)
    exit 4  RecordFailure   the LossNetServer could not record a loss-network version

Anything else is a bug and keeps its traceback. A new user input plugs in by raising ``BadInput(input, problem, fix)``
from its validator: ``input`` names the field, path or URI, ``problem`` what is wrong, ``fix`` what to do.
This module imports nothing from the project (the bottom layer), so every layer may raise these types.
"""
from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

EXIT_BAD_INPUT, EXIT_STORAGE, EXIT_RECORD = 2, 3, 4
DEBUG_ENV = "LKD_DEBUG"  # set to 1 (or pass --debug) to see the traceback of a reported failure


class UserError(Exception):
    """A failure the user can act on; subclasses set its exit code."""

    exit_code = 1


class InputError(UserError):
    """Bad input (exit 2): the message is the line shown, naming the input and what to do."""

    exit_code = EXIT_BAD_INPUT


class BadInput(InputError, ValueError):
    """Bad input, structured: ``input`` (field, path or URI), ``problem`` (what is wrong), ``fix`` (what to do).

    The arguments stay in ``args`` so the error survives pickling (a Ray worker raises it, the driver reports it)."""

    def __init__(self, input: str, problem: str, fix: str = ""):
        super().__init__(input, problem, fix)
        self.input, self.problem, self.fix = input, problem, fix

    def __str__(self) -> str:
        return f"{self.input}: {self.problem}" + (f" — {self.fix}" if self.fix else "")


class StorageFailure(UserError):
    """Storage could not be used (exit 3)."""

    exit_code = EXIT_STORAGE


class RecordFailure(UserError):
    """The LossNetServer could not record a loss-network version (exit 4)."""

    exit_code = EXIT_RECORD


# pyarrow reports S3 failures (Ray Train's checkpoint storage) as plain OSError with no subtype; these markers are the
# only way to tell them from a local OSError, so this one case reads the text (a storage outage, exit 3).
ARROW_MARKERS = ("AWS Error", "curlCode")


@dataclass(frozen=True)
class Failure:
    code: int
    line: str       # what the console shows after "error: " (the message with what to do in this context)
    message: str    # the error's own words, on one line
    error: BaseException
    wrapped: bool   # found inside a wrapper (a worker's or an actor's failure), not raised in this process

    @property
    def kind(self) -> str:
        return {EXIT_BAD_INPUT: "input", EXIT_STORAGE: "storage", EXIT_RECORD: "lossnet"}[self.code]


def causes(e: BaseException) -> Iterator[BaseException]:
    """``e`` and what it wraps — explicit causes only (``raise … from``, Ray's task and Train's worker/controller
    wrappers), never the exception being handled when it was raised (``__context__``): an error raised while
    handling a storage error is not a storage error."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        nested = [x.__cause__, getattr(x, "cause", None), getattr(x, "_base_exc", None),
                  getattr(x, "controller_failure", None), *(getattr(x, "worker_failures", None) or {}).values()]
        stack += [y for y in reversed(nested) if isinstance(y, BaseException)]


def _unwrap(x: BaseException) -> BaseException:
    """What was raised, not Ray's wrapper: an actor call's error arrives as ``RayTaskError(Cls)``, an instance of
    ``Cls`` too, whose text starts with the task's name, pid and colour codes."""
    inner = getattr(x, "cause", None)
    return inner if isinstance(inner, BaseException) and isinstance(x, type(inner)) else x


def one_line(x: BaseException) -> str:
    """The message on one line (a config error lists its fields on several)."""
    return " ".join(s.strip() for s in str(_unwrap(x)).splitlines() if s.strip()) or type(x).__name__


def explain(e: BaseException) -> Failure | None:
    """The failure behind ``e`` (however deep Ray wrapped it), or None when it is not one the user can act on.

    Precedence when a wrapper holds several: the server's record (4), then bad input (2), then storage (3)."""
    found: dict[int, tuple[BaseException, bool]] = {}
    arrow = None
    for depth, x in enumerate(causes(e)):
        x = _unwrap(x)
        if isinstance(x, UserError) and x.exit_code not in found:
            found[x.exit_code] = (x, depth > 0 and x is not e)
        elif arrow is None and isinstance(x, OSError) and any(m in str(x) for m in ARROW_MARKERS):
            arrow = x
    for code in (EXIT_RECORD, EXIT_BAD_INPUT, EXIT_STORAGE):
        if code in found:
            x, wrapped = found[code]
            msg = one_line(x)
            return Failure(code, _line(msg, code, wrapped), msg, x, wrapped)
    if arrow is not None:
        msg = f"Ray Train could not reach its checkpoint storage ({str(arrow).splitlines()[0]})"
        return Failure(EXIT_STORAGE, _line(msg, EXIT_STORAGE, True), msg, arrow, True)
    return None


def _line(msg: str, code: int, wrapped: bool) -> str:
    if code == EXIT_RECORD:
        return (f"{msg} — the run stopped so that no loss-network version goes unrecorded; this is not a storage outage "
                "(see the LossNetServer's log in Ray's logs), and rerunning resumes from the last checkpoint and the "
                "newest saved version")
    if code == EXIT_STORAGE and wrapped:
        hint = "" if "rerun" in msg else (" (the run resumes from its last checkpoint: rerun the same command once "
                                          "storage is reachable)")
        return f"storage failed during the run: {msg}{hint}"
    return msg


def debug_enabled(flag: bool | None = None) -> bool:
    return bool(flag) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report(e: BaseException, debug: bool | None = None, file=None) -> int | None:
    """Print ``error: <line>`` for a failure the user can act on and return its exit code (the traceback first,
    only with ``--debug`` / ``LKD_DEBUG=1``); None, printing nothing, for anything else."""
    f = explain(e)
    if f is None:
        return None
    out = file or sys.stderr
    if debug_enabled(debug):
        traceback.print_exception(type(e), e, e.__traceback__, file=out)
    print(f"error: {f.line}", file=out, flush=True)
    return f.code


@contextmanager
def user_errors(debug: bool | None = None) -> Iterator[None]:
    """``with user_errors(args.debug): …`` — a failure the user can act on exits with its code and one line;
    anything else propagates with its traceback (a bug)."""
    try:
        yield
    except Exception as e:
        code = report(e, debug)
        if code is None:
            raise
        raise SystemExit(code) from None

