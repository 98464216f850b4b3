"""How `deepfield run` (and `deepfield demo`) start a run: Prefect's API server started before the run
configuration is validated (and undone if it is refused), then Ray and, where the store holds the fields, the
actors beside it (flows/prestart.py), then the run flow, with every error one line (the traceback in the run
directory)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .cli_common import adopt_third_party_logs, fail, verbosity

__all__ = ["start_api_early", "undo_early_api", "run_survey"]


def start_api_early(config: Path, run_dir: Optional[Path]):
    """Start the run's Prefect API server before the run configuration is validated (which imports every stage,
    about 1 s of a 2-core machine): (the run directory it is for, the wait function of
    prefect_env.start_ephemeral_api, what `undo_early_api` needs), or None when the file gives no run directory
    as a string, Prefect is imported or its home or API set already, or the directory cannot be made."""
    import os
    import sys
    from deepfield.tasks.yaml_io import read_mapping, relative_to_file
    if os.environ.get("PREFECT_API_URL") or os.environ.get("PREFECT_HOME") or "prefect" in sys.modules:
        return None
    try:
        data = read_mapping(config)
    except ValueError:
        return None  # the validation reports it
    given = str(run_dir.resolve()) if run_dir else data.get("run_dir")
    if not isinstance(given, str) or not given:
        return None
    rd = relative_to_file(config, given)  # as load_run_config reads it
    home = rd / ".deepfield-prefect"
    made = next((p for p in [*reversed(home.parents), home] if not p.exists()), None)  # the first directory made
    env = dict(os.environ)
    try:
        api_ready = _start_api(rd)
        if api_ready is not None:
            return rd, api_ready, (made, env)
    except OSError:
        pass
    undo_early_api((rd, None, (made, env)))
    return None


def _start_api(run_dir: Path):
    """Prefect set up for `run_dir` (its state in `.deepfield-prefect/`, flows/prefect_env.py) and, when a local
    port can be reserved, its API server's process started: the wait function of
    prefect_env.start_ephemeral_api, else None."""
    from deepfield.flows import prefect_env
    prefect_env.configure(run_dir / ".deepfield-prefect")
    return prefect_env.start_ephemeral_api() if prefect_env.reserve_local_api() else None


def undo_early_api(early) -> None:
    """The command stops before its run: the early API server stopped, the environment as it was, and the
    directory made for the server's state removed."""
    import os
    import shutil
    from deepfield.flows import prefect_env
    if early is None:
        return
    made, env = early[2]
    prefect_env.stop_local_api()
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)


def run_survey(cfg, early=None) -> dict:
    """The run of `cfg` (the `run` and `demo` commands); `early`: what start_api_early started for this run
    directory, else None."""
    from deepfield.flows import prefect_env
    try:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if early is not None and early[0].resolve() == cfg.run_dir.resolve():
            api_ready = early[1]
        else:
            undo_early_api(early)  # (for another directory: not expected, as both read the same file)
            # before prefect is imported: the API server's process starts now, beside the imports below and Ray's
            api_ready = _start_api(cfg.run_dir)
    except OSError as exc:
        fail(f"{exc.filename or cfg.run_dir}: {exc.strerror or exc}")
    adopt_third_party_logs()  # Ray's loggers through the run's handlers, before Ray starts
    from deepfield.flows.prestart import prestart_pool
    from deepfield.tasks.actor_pool import discard_prestarted, start_ray
    from deepfield.tasks.locks import LockedError
    from deepfield.tasks.stages.registry import BandError
    try:
        # Prefect's API server, Ray and the actors each take seconds to start: side by side. The server's
        # process is started first (flows/prefect_env.py), then Ray, then the actors when the store holds the
        # fields already (flows/prestart.py); Prefect's own modules are imported while they start.
        api_ready = api_ready or prefect_env.start_ephemeral_api()
        start_ray(cfg.ray.address, cfg.ray.num_actors)
        prestart_pool(cfg)
        from deepfield.flows.run import run_flow
        prefect_env.quiet_run_logs(console=verbosity() >= 2)  # after Prefect's import, which sets its loggers
        adopt_third_party_logs()
        api_ready()
        with prefect_env.flow_settings():
            return run_flow(cfg)
    except BandError as exc:  # the survey's fields lack bands a stage needs: nothing was processed
        fail(f"{cfg.inputs}: {exc}")
    except LockedError as exc:  # another run of this run directory is under way
        fail(str(exc))
    except OSError as exc:  # the run directory or the store cannot be written: a read-only place, a file
        fail(f"{exc.filename or cfg.run_dir}: {exc.strerror or exc}")
    except Exception as exc:  # anything else: one line here, the traceback in the run directory
        import traceback
        log = cfg.run_dir / "run-error.log"
        try:
            log.write_text("".join(traceback.format_exception(exc)))
        except OSError:
            log = None
        fail(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
             + (f" (traceback in {log})" if log else ""), code=1)
    finally:
        discard_prestarted()  # none left once run_tiles took them; else (no tile to do, a failure) stopped here
