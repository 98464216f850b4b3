"""`deepfield status` and `deepfield schema`: commands that read what a run or the code declares and change
nothing (registered on the main app by flows/cli.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .cli_common import fail

_COMMANDS: list = []


def _command(**kwargs):
    """Collect a command to register on the main app, in this order."""
    def collect(fn):
        _COMMANDS.append((fn, kwargs))
        return fn
    return collect


def register(app: typer.Typer) -> None:
    for fn, kwargs in _COMMANDS:
        app.command(**kwargs)(fn)


COUNT_NAMES = {"sky_steps": "sky steps (amplifier offsets) taken out by the background stage (its INFO log lines "
                             "give the band, position and height)"}
STATUS_KEYS = {
    "run_dir": "the run directory, as given",
    "tiles": "tiles with a sound ledger record",
    "status": "tiles by status ({done: n, failed: n})",
    "retried": "tiles that took more than one attempt",
    "sources": "sources detected, over every tile",
    "primary": "sources primary in their tile",
    "counts": "what the stages counted besides the sources, summed over the tiles, and in how many tiles "
              "({name: {total, tiles}}; sky_steps: sky steps, such as amplifier offsets, that the background "
              "stage took out)",
    "stage_seconds": "seconds per stage, summed over the tiles ({stage: seconds})",
    "config_hashes": "the configuration hashes the records were made under",
    "failed": "the failed tiles and their errors ([{tile, error}])",
    "problems": "records and tile tables that cannot be read (a list of lines)",
}


@_command(help="""Summarise a run's ledger: tiles done and failed, retries, sources, time per stage; every
record and the tile table it points to are checked, and what cannot be read is listed (exit status 1, as for
failed tiles).\n\n--json prints the same facts as one JSON object with the keys: """
             + "; ".join(f"{k}: {v}" for k, v in STATUS_KEYS.items()) + ".")
def status(run_dir: Path = typer.Argument(..., help="a run directory"),
           as_json: bool = typer.Option(False, "--json", help="print the facts as JSON (keys above)")) -> None:
    from deepfield.tasks.ledger import summarise

    if not (run_dir / "ledger").is_dir():
        fail(f"{run_dir}: no ledger/ here; not a run directory")
    s = summarise(run_dir)
    if as_json:
        facts = dict(s, run_dir=str(run_dir), failed=[{"tile": t, "error": e} for t, e in s["failed"]])
        typer.echo(json.dumps({k: facts[k] for k in STATUS_KEYS}, indent=1))
    else:
        typer.echo(f"tiles: {s['tiles']}  " + "  ".join(f"{k}: {v}" for k, v in sorted(s["status"].items()))
                   + f"  retried: {s['retried']}")
        typer.echo(f"sources: {s['sources']} detected, {s['primary']} primary in their tile")
        typer.echo("time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in s["stage_seconds"].items()))
        typer.echo(f"configuration hashes: {', '.join(s['config_hashes'])}")
        for name, c in s["counts"].items():
            typer.echo(f"{COUNT_NAMES.get(name, name)}: {c['total']} in {c['tiles']} tile(s)")
        for tile, err in s["failed"]:
            typer.echo(f"failed {tile}: {err}")
        for problem in s["problems"]:
            typer.echo(f"unreadable: {problem}")
    if s["failed"] or s["problems"]:
        raise typer.Exit(1)


@_command(help="""Print the declared schema of the catalogs (catalogs/schema.py): every column's type, unit,
UCD and description, for the source catalog and the candidate tables. docs/schema.md is this command's
--markdown output.""")
def schema(markdown: bool = typer.Option(False, "--markdown", help="the documentation page (Markdown) instead of "
                                         "tab-separated rows: table, column, type, unit, UCD, description"),
           table: Optional[str] = typer.Option(None, "--table", help="only this table: sources, lens_candidates, "
                                               "clusters or anomalies")) -> None:
    from deepfield.catalogs import schema as declared

    if table is not None and table not in declared.TABLES:
        fail(f"--table {table}: no such table (tables: {', '.join(declared.TABLES)})")
    if markdown:
        sys.stdout.write(declared.markdown())
        return
    for name, cols in declared.TABLES.items():
        if table in (None, name):
            for c in cols:
                typer.echo("\t".join((name, c.name, c.type, c.unit, c.ucd, c.description)))
