"""What `deepfield ingest` and `deepfield run` print when they finish (flows/cli.py): the ingest's notes, the
run's counts, timings, merge results, stages left out and failures grouped by their error."""
from __future__ import annotations

from .cli_common import console

__all__ = ["print_ingest_notes", "print_run"]


def print_ingest_notes(results: list[dict]) -> None:
    """The ingest's notes on what changed the pixels or their meaning (estimated or rescaled noise, a measured
    PSF, resampling, a zero point from FLUXMAG0 or BUNIT), one line each; routine ones stay in the store's
    attributes."""
    for r in results:
        for note in r.get("notes", []):
            if "kept (our MP keywords)" not in note:
                console.print(f"  {r['field']}: {note}", markup=False)


def print_run(summary: dict, cfg) -> None:
    ing, proc, mer, sec = summary["ingest"], summary["process"], summary["merge"], summary["seconds"]
    n = {s: sum(r["status"] == s for r in ing) for s in ("ingested", "skipped", "failed")}
    console.print(f"ingest:  {n['ingested']} field(s) ingested, {n['skipped']} unchanged, {n['failed']} failed "
                  f"({sec['ingest']:.1f} s)")
    print_ingest_notes(ing)
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
        console.print(f"merge:   {mer.get('rows_out', '?')} sources in the catalog ({sec['merge']:.1f} s)")
        missing, ignored = mer.get("missing_tiles") or [], mer.get("ignored_tables") or []
        if missing:
            console.print(f"         {len(missing)} tile(s) of the run are not in it (not done): "
                          + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if ignored:
            console.print(f"         {len(ignored)} table(s) under tiles/ are not this run's and were left out: "
                          + ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    if proc.get("damaged_fields"):
        console.print(f"[bold red]damaged:[/] field(s) {', '.join(proc['damaged_fields'])} failed their store's "
                      "integrity check; the next run ingests them again from their inputs")
    if proc.get("pruned"):
        console.print(f"         removed {len(proc['pruned'])} tile(s) of another configuration (tile size or "
                      "stages) that are not tiles of this run")
    for line in mer.get("report", []):  # what the stages' merge steps wrote
        console.print(line, markup=False)
    for r in ing:
        if r["status"] == "failed":
            console.print(f"[bold red]failed field:[/] {r['error']}")
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
    console.print(f"[bold red]failed:[/] {len(failed)} tile(s), {len(groups)} distinct error(s):")
    for err, tiles in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        console.print(f"  {len(tiles)} tile(s): {err}", markup=False)
        console.print("    " + ", ".join(tiles[:6]) + (f" and {len(tiles) - 6} more" if len(tiles) > 6 else ""),
                      markup=False)
