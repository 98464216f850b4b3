"""What `deepfield ingest` and `deepfield run` print when they finish (flows/cli.py): the ingest's notes, the
run's counts, timings, merge results, the paths of its outputs, stages left out and failures grouped by their
error. The summary goes to the console (silent with -q), errors to the error console (always printed); paths
are relative to the current directory where that is shorter."""
from __future__ import annotations

import re

from .cli_common import console, errors, rel

__all__ = ["print_ingest_notes", "print_run", "output_lines"]

_BAND_COUNT = re.compile(r"band (\S+): (\d+) (.+)")


MAX_NOTE_FIELDS = 12  # fields (or groups of fields with the same notes) whose notes are printed in full


def _note_lines(notes: list[str]) -> list[str]:
    """A field's notes as printed: routine ones left out, those that differ only in band and count as one line."""
    groups: dict[str, list[tuple[str, str]]] = {}
    lines: list[str | tuple] = []
    for note in notes:
        if "kept (our MP keywords)" in note:
            continue
        m = _BAND_COUNT.fullmatch(note)
        if m is None:
            lines.append(note)
            continue
        if m[3] not in groups:
            groups[m[3]] = []
            lines.append(("group", m[3]))
        groups[m[3]].append((m[1], m[2]))
    out = []
    for line in lines:
        if isinstance(line, tuple):
            members = groups[line[1]]
            line = (f"band {members[0][0]}: {members[0][1]} {line[1]}" if len(members) == 1 else
                    ", ".join(f"{b} {n}" for b, n in members) + f" {line[1]}")
        out.append(line)
    return out


def print_ingest_notes(results: list[dict], store: str | None = None) -> None:
    """The ingest's notes on what changed the pixels or their meaning (estimated or rescaled noise, a measured
    PSF, resampling, a zero point from FLUXMAG0 or BUNIT), one line each; routine ones stay in the store's
    attributes. A field's notes that differ only in band and count ("band g: 12 pixels ... masked") are one
    line: "g 12, r 30 pixels ... masked". Fields with the same notes are printed once, as a group ("f0000,
    f0001 and 198 more fields: ..."), and at most MAX_NOTE_FIELDS fields or groups are printed: a survey of
    thousands of fields would otherwise print thousands of lines; every field's notes are in its store
    attributes (`notes`)."""
    by_lines: dict[tuple[str, ...], list[str]] = {}
    for r in results:
        lines = tuple(_note_lines(r.get("notes", [])))
        if lines:
            by_lines.setdefault(lines, []).append(r["field"])
    for k, (lines, names) in enumerate(by_lines.items()):
        if k == MAX_NOTE_FIELDS:
            rest = sum(len(v) for v in list(by_lines.values())[k:])
            where = f" of the store {rel(store)}" if store else ""
            console.print(f"  ... and the notes of {rest} more field(s): in each field's attributes (`notes`)"
                          f"{where}", markup=False)
            break
        who = names[0] if len(names) == 1 else \
            (", ".join(names) if len(names) <= 3 else f"{names[0]}, {names[1]} and {len(names) - 2} more fields")
        for line in lines:
            console.print(f"  {who}: {line}", markup=False)


def output_lines(items) -> list[str]:
    """Aligned `  name: text` lines of (name, text) pairs, or of a {name: path} mapping (the merge summary's
    `paths`) with each path relative where that is shorter."""
    if isinstance(items, dict):
        items = [(k, rel(v)) for k, v in items.items()]
    width = max((len(k) for k, _ in items), default=0)
    return [f"  {k + ':':<{width + 1}} {v}" for k, v in items]


def print_run(summary: dict, cfg, log_file=None, paths: bool = True) -> None:
    """The run's summary; with `paths`, every output's path (the merge summary's `paths`) and the log file's."""
    ing, proc, mer, sec = summary["ingest"], summary["process"], summary["merge"], summary["seconds"]
    n = {s: sum(r["status"] == s for r in ing) for s in ("ingested", "skipped", "failed")}
    console.print(f"ingest:  {n['ingested']} field(s) ingested, {n['skipped']} unchanged, {n['failed']} failed "
                  f"({sec['ingest']:.1f} s)")
    print_ingest_notes(ing, str(cfg.store_path))
    for stage, variant in (summary.get("weights_variants") or {}).items():
        if variant:
            console.print(f"         stage {stage}: the {variant} weights (of the shipped band sets, the one with the "
                          "most of the fields' bands)")
    console.print(f"process: {proc['done']} tile(s) processed, {proc['skipped']} already done, {proc['failed']} failed, "
                  f"{proc['retries']} retried, on {proc['actors']} actor(s) ({sec['process']:.1f} s)")
    if proc.get("stage_seconds"):
        tot = sum(proc["stage_seconds"].values()) or 1.0
        console.print("         stage time: " + ", ".join(f"{k} {v:.1f} s ({100 * v / tot:.0f}%)"
                                                         for k, v in proc["stage_seconds"].items()))
    if summary.get("stopped"):
        console.print(f"stopped: {proc['tiles'] - proc['skipped'] - proc['done'] - proc['failed']} tile(s) left "
                      f"({proc['released']} released in flight); merge skipped; run again to resume from the ledger")
    elif not mer:
        console.print("merge:   skipped: no tile of this run is done")
    else:
        note = ", up to date: nothing changed since they were merged" if mer.get("up_to_date") else ""
        console.print(f"merge:   {mer.get('rows_out', '?')} sources in the catalog ({sec['merge']:.1f} s{note})")
        missing, ignored = mer.get("missing_tiles") or [], mer.get("ignored_tables") or []
        if missing:
            console.print(f"         {len(missing)} tile(s) of the run are not in it (not done): "
                          + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if ignored:
            console.print(f"         {len(ignored)} table(s) under tiles/ are not this run's and were left out: "
                          + ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    if proc.get("damaged_fields"):
        errors.print(f"[bold red]damaged:[/] field(s) {', '.join(proc['damaged_fields'])} failed their store's "
                      "integrity check; the next run ingests them again from their inputs")
    if proc.get("pruned"):
        console.print(f"         removed {len(proc['pruned'])} tile(s) of another configuration (tile size or "
                      "stages) that are not tiles of this run")
    run_dir = str(cfg.run_dir)
    for line in mer.get("report", []):  # what the stages' merge steps wrote, the run directory's path shortened
        console.print(line.replace(run_dir, rel(run_dir)), markup=False)
    if paths and mer.get("paths"):
        console.print("outputs:")
        for line in output_lines(mer["paths"]):
            console.print(line, markup=False)
    if paths and log_file is not None:
        console.print(f"log:     {rel(log_file)}", markup=False)
    for r in ing:
        if r["status"] == "failed":
            errors.print(f"[bold red]failed field:[/] {r['error']}")
    for line in summary.get("skipped_stages") or []:
        console.print(line, markup=False)
    from deepfield.tasks.ledger import summarise
    _print_failures(summarise(cfg.run_dir)["failed"])


def _print_failures(failed: list[tuple[str, str]]) -> None:
    """The failed tiles grouped by their error (its first line, the tile's and its field's names taken out),
    the most common first, with the tiles each hit; `deepfield status RUN_DIR` has every tile's error."""
    if not failed:
        return
    groups: dict[str, list[str]] = {}
    for tile, err in failed:
        first = (str(err).strip().splitlines() or ["(no message)"])[0]
        key = first.replace(tile, "<tile>").replace(repr(tile.partition("/")[0]), "<field>")
        groups.setdefault(key, []).append(tile)
    errors.print(f"[bold red]failed:[/] {len(failed)} tile(s), {len(groups)} distinct error(s):")
    for err, tiles in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        errors.print(f"  {len(tiles)} tile(s): {err}", markup=False)
        errors.print("    " + ", ".join(tiles[:6]) + (f" and {len(tiles) - 6} more" if len(tiles) > 6 else ""),
                      markup=False)
