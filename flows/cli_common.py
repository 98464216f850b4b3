"""What every `deepfield` command module shares: the stderr consoles, the one-line error exit, the -v/-q
options and the logging they set, and the run's log file.

Verbosity (every command's -q, -v, -vv): -q prints errors and the final result lines only (the command's
standard output); the default adds the summary on standard error and WARNING records of every logger; -v
adds deepfield's INFO records; -vv DEBUG records of everything, third-party libraries included. Third-party
libraries (Ray, Dask/distributed, Prefect, hats, lsdb) stay at WARNING below -vv, whatever they set for
themselves at import (Ray and distributed install their own stderr handlers: they are routed here). Output
that is not a terminal is not wrapped (a log keeps each path on one line).

The log file (`run` and `demo`: RUN_DIR/logs/run-<UTC time>.log) holds deepfield's INFO records and the
WARNING records of everything, whatever the verbosity.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from typer.core import TyperGroup

__all__ = ["console", "errors", "fail", "rel", "verbosity", "run_log", "adopt_third_party_logs", "show_info",
           "VerboseGroup"]

console = Console(stderr=True)  # the summary: silent with -q
errors = Console(stderr=True)  # errors: printed at every verbosity

# (Prefect's logging.yml gives prefect.server, .client and .infrastructure levels of their own)
THIRD_PARTY = ("ray", "distributed", "dask", "prefect", "hats", "hats_import", "lsdb",
               "prefect.server", "prefect.client", "prefect.infrastructure")
# notices that are no news to an operator: Ray's token-authentication default (kept: it is only not said)
_NOTICES = ("ray._private.authentication.authentication_token_setup",)
_level = 0  # the verbosity of the command running: -1 (-q) to 2 (-vv)
_shown = {"deepfield"}  # the loggers whose INFO records the console and the log file take (besides WARNING up)


def verbosity() -> int:
    return _level


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` and exit with `code` (2: bad input or configuration)."""
    errors.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def rel(path) -> str:
    """`path` relative to the current directory when that is shorter, else as given."""
    p = str(path)
    try:
        r = os.path.relpath(p)
    except ValueError:  # another drive
        return p
    return r if len(r) < len(p) else p


class _Ours(logging.Filter):
    """deepfield's records (and those of the loggers `show_info` added), and everybody's from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or any(record.name == n or record.name.startswith(n + ".")
                                                        for n in _shown)


def show_info(name: str) -> None:
    """Show the INFO records of logger `name` too, for the command running (`serve`: Prefect's runner)."""
    _shown.add(name)
    if _level < 2:
        logging.getLogger(name).setLevel(logging.INFO)


class StderrHandler(logging.StreamHandler):
    """A stream handler writing to the sys.stderr of the moment (a test runner swaps it per command). Its name
    has no leading underscore: Prefect then keeps its own console handler off the root logger."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_deepfield", False)]


def adopt_third_party_logs() -> None:
    """Route the loggers of Ray and distributed, which print through handlers of their own (installed when they
    are imported), through the root logger's handlers instead (the console, the run's log file); importing ray
    first, as a run does anyway. Call after the verbosity is set."""
    import ray  # noqa: F401  (its import installs its handler)
    _route_own_handlers()
    _set_levels(_level)


def _route_own_handlers() -> None:
    """Ray's and distributed's loggers, where those are imported, through the root logger (their own stderr
    handlers removed, propagation on): Ray sets its own up again at ray.init."""
    for name in ("ray", "distributed"):
        if name in sys.modules:
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.propagate = True


def _set_levels(level: int) -> None:
    logging.getLogger().setLevel(logging.DEBUG if level >= 2 else logging.WARNING)
    logging.getLogger("deepfield").setLevel(logging.DEBUG if level >= 2 else logging.INFO)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.DEBUG if level >= 2 else logging.WARNING)
    for name in _NOTICES:
        logging.getLogger(name).setLevel(logging.DEBUG if level >= 2 else logging.ERROR)


@contextmanager
def _logging(level: int):
    """Console and logging of one command at verbosity `level`; restored after it."""
    global _level
    previous = _level
    _level = level
    console.quiet = level < 0
    for c in (console, errors):  # no hard wrapping where the output is a file (a log, a pipe)
        c.soft_wrap = not c.is_terminal
    if level >= 2:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "DEBUG")  # before prefect is imported
    for name, env in (("distributed", "DASK_LOGGING__DISTRIBUTED"),):
        if name not in sys.modules:  # distributed's own handler, level and propagation at its import
            os.environ.setdefault(env, "debug" if level >= 2 else "warning")
    root = logging.getLogger()
    for h in _handlers():
        root.removeHandler(h)
    handler = StderrHandler()
    handler._deepfield = True
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.ERROR if level < 0 else logging.WARNING if level == 0 else logging.DEBUG)
    if level < 2:
        handler.addFilter(_Ours())
    root.addHandler(handler)
    _route_own_handlers()
    names = ("", "deepfield", *THIRD_PARTY, *_NOTICES)
    levels = {n: logging.getLogger(n).level for n in names}  # restored after the command (tests run many)
    _set_levels(level)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)
        _shown.intersection_update({"deepfield"})
        _level = previous
        console.quiet = False


@contextmanager
def run_log(run_dir: Path, name: str = "run"):
    """A log file RUN_DIR/logs/<name>-<UTC time>.log for the command's duration: deepfield's INFO records and
    the WARNING records of everything (every verbosity), times in UTC. Yields its path."""
    logs = Path(run_dir) / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"{exc.filename or logs}: {exc.strerror or exc}")
    path = logs / f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    fmt.converter = time.gmtime
    handler.setFormatter(fmt)
    handler.setLevel(logging.INFO)
    handler.addFilter(_Ours())
    handler._deepfield = True
    logging.getLogger().addHandler(handler)
    try:
        yield path
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


_VERBOSE = ("verbose", "quiet")


def _with_verbosity(callback):
    @functools.wraps(callback)
    def run(*args, **kwargs):
        v, q = kwargs.pop("verbose", 0), kwargs.pop("quiet", False)
        with _logging(-1 if q else v):
            return callback(*args, **kwargs)
    return run


@functools.cache
def _verbosity_options() -> list:
    """The -v and -q options, built by Typer (so that its help shows them like every other option)."""
    def options(verbose: int = typer.Option(0, "-v", "--verbose", count=True, help="more output: -v adds "
                                            "deepfield's INFO logs, -vv DEBUG logs of everything"),
                quiet: bool = typer.Option(False, "-q", "--quiet", help="print only errors and the final "
                                           "result lines")) -> None:
        pass
    one = typer.Typer(add_completion=False)
    one.command()(options)
    return list(typer.main.get_command(one).params)


def _add_verbosity(cmd) -> None:
    """Add -v and -q to a command (Typer's click objects), or to every command of a group."""
    if hasattr(cmd, "commands"):  # a group (Typer vendors click: no isinstance with click's classes)
        for sub in cmd.commands.values():
            _add_verbosity(sub)
        return
    if any(p.name in _VERBOSE for p in cmd.params) or cmd.callback is None:
        return
    cmd.params += _verbosity_options()
    cmd.callback = _with_verbosity(cmd.callback)


class VerboseGroup(TyperGroup):
    """The command group of `deepfield`: every command under it (sub-groups' too) gets -v/--verbose (repeatable)
    and -q/--quiet, which set the console's and logging's verbosity for the command's duration."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for cmd in self.commands.values():
            _add_verbosity(cmd)
