"""The run's review report, `RUN/report/index.html`: one static page (no server, no script, relative links
only) written at the end of the run's merge (flows/merge.py), to look at what the run found.

- the run: its fields, tiles, rows and missing tiles, with links to the catalogs;
- field previews (catalogs/report_images.py): the field's RGB with the detections and the candidates marked, at
  most `max_fields` (24) fields;
- the ranked lens, anomaly and cluster candidates, the first `top` (50) of each list, each with the RGB picture
  of its cutout (the FITS cutouts with WCS beside the tables, catalogs/cutouts.py, linked) and its numbers;
- completeness against the truth where the run's inputs are a simulation (`deepfield simulate`'s manifest names
  its truth tables, as `deepfield demo` and `deepfield eval` read them): fraction of the truth's primary objects
  detected against magnitude, per band;
- per-stage timings: the ledger's timings of the merged tiles (tasks/ledger.py: read, each stage, write, seconds
  in the tile's actor, when the tile was processed), summed per stage, and the merge's wall time.

Pictures are in `fields/`, `cutouts/` and `plots/` beside index.html. The report is built in a version directory
beside `RUN/report` and shown by one atomic rename of the `report` link (tasks.atomic.publish_version): a reader
sees the old report or the new one, never a mix; the run holds its lock meanwhile (one writer).
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from deepfield.tasks.atomic import publish_version, version_dir
from deepfield.tasks.ledger import Ledger
from deepfield.tasks.tiling import TileId
from deepfield.tasks.version import __version__

from .report_images import completeness, completeness_plot, cutout_pictures, field_preview, preview_footprints

__all__ = ["write_report", "simulation_truth", "stage_timings", "REPORT_DIR", "REPORT_TOP", "MERGE_KEY_FILE"]

REPORT_DIR = "report"
REPORT_TOP = 50  # candidates shown per list
MERGE_KEY_FILE = "merge.key"  # the merge_key of the catalogs the report shows
MAX_FIELDS = 24  # field previews
# kind -> (table key, cutout file key, id column, EXTNAME prefix, label prefix, title)
LISTS = {"lens": ("lens_candidates", "lens_cutouts", "lens_rank", "LENS", "L", "Lens candidates"),
         "anomaly": ("anomalies", "anomaly_stamps", "anomaly_rank", "ANOMALY", "A", "Anomaly candidates"),
         "cluster": ("clusters", "cluster_cutouts", "cluster_id", "CLUSTER", "C", "Galaxy clusters")}

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1280px;padding:0 16px;color:#222}
h1{font-size:22px;margin:16px 0 4px}h2{font-size:18px;margin:24px 0 8px;border-bottom:1px solid #ccc}
.meta{color:#555}table{border-collapse:collapse}td,th{padding:2px 10px;text-align:right}th{background:#eee}
td:first-child,th:first-child{text-align:left}.bar{background:#69c;height:10px;display:inline-block}
.fields,.cands{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}
.fields figcaption{max-width:600px}.cand{width:150px;font-size:12px;background:#f5f5f5;padding:4px}
.cand img{width:150px;height:150px;image-rendering:pixelated;background:#000;display:block}
.key span{padding:0 6px;border-radius:3px;color:#000}code{font-size:12px}"""


def simulation_truth(inputs: Path | None) -> Path | None:
    """The truth table of simulated objects when the run's `inputs` are a `deepfield simulate` manifest (its
    `truth: objects:` entry, relative to it), else None."""
    if inputs is None:
        return None
    import yaml
    try:  # libyaml's parser where PyYAML has it: the pure-Python one took 6 s over a 1,000-field manifest
        data = yaml.load(Path(inputs).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or data.get("kind") != "deepfield-simulation":
        return None
    rel = (data.get("truth") or {}).get("objects")
    path = Path(inputs).parent / rel if rel else None
    return path if path is not None and path.is_file() else None


def stage_timings(run_dir: Path, tables: list[Path]) -> tuple[dict[str, float], int]:
    """Seconds per stage summed over the ledger records of the tiles whose tables are `tables`
    (RUN/tiles/<field>/<ty>_<tx>.parquet), and the number of records found."""
    ledger = Ledger(run_dir)
    total: dict[str, float] = {}
    n = 0
    for t in tables:
        try:
            rec = ledger.get(TileId.parse(f"{Path(t).parent.name}/{Path(t).stem}"))
        except ValueError:
            rec = None
        if rec is None:
            continue
        n += 1
        for k, v in rec.timings.items():
            total[k] = total.get(k, 0.0) + float(v)
    return total, n


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _num(v, fmt: str = ".2f") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    return "–" if not np.isfinite(f) else format(f, fmt)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _link(path: Path | None, report: Path) -> str:
    """A relative link from the report to `path` when it lies in the run directory; its name otherwise."""
    if path is None:
        return ""
    try:
        rel = os.path.relpath(path, report)
    except ValueError:
        return _e(Path(path).name)
    if rel.startswith(os.pardir + os.sep + os.pardir):
        return f"<code>{_e(Path(path).name)}</code>"
    return f'<a href="{_e(Path(rel).as_posix())}"><code>{_e(Path(path).name)}</code></a>'


def _caption(kind: str, r) -> list[str]:
    """The lines under a candidate's picture."""
    d = r._asdict()
    pos = f"{_e(d.get('field', ''))} · {_num(d['ra'], '.5f')} {_num(d['dec'], '+.5f')}"
    if kind == "lens":
        mags = " ".join(f"{k[9:]} {_num(v)}" for k, v in d.items() if k.startswith("mag_auto_"))
        return [f"<b>L{d['lens_rank']}</b> score {_num(d['lens_score'], '.3f')}", pos, mags,
                f"source_id {d['source_id']}"]
    if kind == "anomaly":
        src = d.get("source_id")
        lines = [f"<b>A{d['anomaly_rank']}</b> σ {_num(d['anomaly_sigma'], '.1f')}", pos]
        if "shape" in d:
            lines.append(f"{_e(d['shape'])}, {_num(d['extent_arcsec'], '.1f')}\" in {_e(d['bands'])}")
        lines.append(f"source_id {src}" if src is not None and not pd.isna(src) else "on no source")
        return lines
    return [f"<b>C{d['cluster_id']}</b> z {_num(d['z'])} (net {_num(d['z_net'])})", pos,
            f"richness {_num(d['richness'], '.0f')} · score {_num(d['score'])}",
            f"{d.get('n_members', '?')} member(s), R<sub>λ</sub> {_num(d.get('r_lambda_arcsec'), '.0f')}\""]


def _candidates(kind: str, table: pd.DataFrame, pictures: dict[str, str], top: int, cutouts_link: str,
                table_link: str) -> str:
    _, _, id_col, prefix, _, title = LISTS[kind]
    shown = table.head(top)
    note = (f"{len(table)} in {table_link}" + (f"; the first {len(shown)} shown" if len(shown) < len(table) else "")
            + (f"; cutouts with WCS: {cutouts_link}" if cutouts_link else ""))
    cards = []
    for r in shown.itertuples(index=False):
        cid = int(getattr(r, id_col))
        png = pictures.get(f"{prefix}_{cid}")
        img = (f'<img src="cutouts/{_e(png)}" alt="{kind} {cid}" width="150" height="150">' if png else "")
        cards.append(f'<figure class="cand" id="{kind}-{cid}" data-kind="{kind}" data-id="{cid}">{img}'
                     f'<figcaption>{"<br>".join(_caption(kind, r))}</figcaption></figure>')
    body = f'<div class="cands">{"".join(cards)}</div>' if cards else "<p>none</p>"
    return f'<section id="{kind}"><h2>{title}</h2><p class="meta">{note}</p>{body}</section>'


def _timings(timings: dict[str, float], n_tiles: int, merge_s: float | None, stages: list[str]) -> str:
    if not timings and merge_s is None:
        return ""
    order = ["read", *stages, "write"]
    rows = [(k, timings[k], timings[k] / max(n_tiles, 1))
            for k in sorted(timings, key=lambda k: (order.index(k) if k in order else len(order), k))]
    top = max([v for _, v, _ in rows] + [merge_s or 0.0, 1e-9])
    out = [f"<tr><td>{_e(k)}</td><td>{v:.1f}</td><td>{m:.2f}</td>"
           f'<td style="text-align:left"><span class="bar" style="width:{200 * v / top:.0f}px"></span></td></tr>'
           for k, v, m in rows]
    if merge_s is not None:
        out.append(f"<tr><td>merge (wall)</td><td>{merge_s:.1f}</td><td></td>"
                   f'<td style="text-align:left"><span class="bar" style="width:{200 * merge_s / top:.0f}px">'
                   f"</span></td></tr>")
    return ('<section id="timings"><h2>Time per stage</h2>'
            f'<p class="meta">summed over the {n_tiles} merged tile(s) from the ledger (seconds in the tile\'s '
            "actor, when the tile was processed), and the merge</p>"
            "<table><tr><th>stage</th><th>seconds</th><th>per tile</th><th></th></tr>"
            + "".join(out) + "</table></section>")


def _completeness(stats: dict, truth: Path, png: str | None) -> str:
    if not stats:
        return ""
    rows = "".join(f"<tr><td>{_e(b)}</td><td>{_num(s['m90'])}</td><td>{_num(s['m50'])}</td>"
                   f"<td>{sum(s['n'])}</td></tr>" for b, s in stats.items())
    img = f'<img src="plots/{png}" alt="completeness" width="640" height="360">' if png else ""
    return ('<section id="completeness"><h2>Completeness against the simulation\'s truth</h2>'
            f'<p class="meta">primary objects of <code>{_e(truth.name)}</code> in the run\'s fields with a catalog '
            "source within 1\"</p>" + img + "<table><tr><th>band</th><th>90 % at</th><th>50 % at</th>"
            f"<th>objects</th></tr>{rows}</table></section>")


def _path(summary: dict, key: str, run_dir: Path) -> Path | None:
    v = (summary.get("paths") or {}).get(key)
    if v is None:
        return None
    p = Path(v)
    return p if p.is_absolute() else run_dir / p


def write_report(run_dir: Path, summary: dict, fields: list[str], store_path: Path | None = None,
                 inputs: Path | None = None, tables: list[Path] | None = None, stages: list[str] | None = None,
                 top: int = REPORT_TOP, max_fields: int = MAX_FIELDS, key: str | None = None) -> Path:
    """Write `run_dir/report/index.html` (module docstring) for the merge `summary` of the run's `fields`;
    returns its path. store_path: the run's store (none: no pictures); inputs: the run's inputs (a simulation's
    manifest gives completeness); tables: the merged tile tables (their ledger timings); stages: the run's
    stage names, in order (the order of the timings); key: the merge's `merge_key`, written beside the page
    (`MERGE_KEY_FILE`) so that a later run can tell the report is that of its catalogs."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    link = run_dir / REPORT_DIR
    build = version_dir(link)
    try:
        _build(build, run_dir, summary, fields, store_path, inputs, tables, stages, top, max_fields, t0)
        if key is not None:
            (build / MERGE_KEY_FILE).write_text(key + "\n")
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    publish_version(build, link)
    return link / "index.html"


def _candidate_sections(build: Path, run_dir: Path, summary: dict, top: int) -> tuple[list[str], pd.DataFrame]:
    """The sections of the candidate lists, their cutouts' pictures written, and the shown candidates' marks
    (kind, ra, dec, label, radius_arcsec) for the field previews."""
    link = run_dir / REPORT_DIR  # relative links are made from where the report is shown
    sections, marks = [], []
    for kind, (key, cut_key, id_col, prefix, letter, _) in LISTS.items():
        path = _path(summary, key, run_dir)
        if path is None:
            continue
        table = pd.read_parquet(path)
        shown = table.head(top)
        cut_path = _path(summary, cut_key, run_dir)
        pictures = (cutout_pictures(cut_path, [f"{prefix}_{int(i)}" for i in shown[id_col]], build / "cutouts",
                                    kind) if cut_path is not None and cut_path.exists() else {})
        sections.append(_candidates(kind, table, pictures, top, _link(cut_path, link) if cut_path else "",
                                    _link(path, link)))
        radius = (shown["r_lambda_arcsec"].to_numpy(float) if kind == "cluster" else
                  np.full(len(shown), 2.4 if kind == "lens" else 3.2))
        marks.append(pd.DataFrame(dict(kind=kind, ra=shown["ra"].to_numpy(float), dec=shown["dec"].to_numpy(float),
                                       label=[f"{letter}{int(i)}" for i in shown[id_col]], radius_arcsec=radius)))
    empty = pd.DataFrame(dict(kind=[], ra=[], dec=[], label=[], radius_arcsec=[]))
    return sections, (pd.concat(marks, ignore_index=True) if marks else empty)


def _field_section(build: Path, flat: Path | None, store_path: Path, fields: list[str], candidates: pd.DataFrame,
                   max_fields: int) -> str:
    """The field previews (at most `max_fields`), written, and their section."""
    shown = sorted(fields)[:max_fields]
    det = (pads.dataset(flat, format="parquet").to_table(
        columns=["field", "x", "y", "ra", "dec"], filter=pads.field("field").isin(shown)).to_pandas()
        if flat is not None else pd.DataFrame(dict(field=[], x=[], y=[], ra=[], dec=[])))
    from deepfield.tasks.zarr_store import open_store
    figures = []
    root = open_store(Path(store_path))  # once: each open parses the consolidated metadata of every field
    footprints = preview_footprints(root, set(det["field"]) | set(shown))
    for k, f in enumerate(shown):
        name = f"{k:03d}_{_safe(f)}.png"
        info = field_preview(Path(store_path), f, det, candidates, build / "fields" / name, footprints=footprints,
                             root=root)
        figures.append(
            f'<figure><img src="fields/{_e(name)}" alt="field {_e(f)}" width="{info["width"]}" '
            f'height="{info["height"]}"><figcaption><b>{_e(f)}</b>: {int((det["field"] == f).sum())} source(s) it '
            f'owns; RGB {_e(", ".join(info["bands"]))}, binned {info["binning"]}x{info["binning"]}, north up'
            "</figcaption></figure>")
    key = ('<p class="key">marks: <span style="background:rgb(0,230,255)">detection</span> '
           '<span style="background:rgb(255,225,0)">lens L</span> <span style="background:rgb(255,60,255)">'
           'anomaly A</span> <span style="background:#fff;outline:1px solid #999">cluster C (R<sub>λ</sub>)</span>'
           '</p>')
    more = f'<p class="meta">the first {len(shown)} of {len(fields)} fields</p>' if len(fields) > len(shown) else ""
    return f'<section id="fields"><h2>Fields</h2>{key}{more}<div class="fields">{"".join(figures)}</div></section>'


def _truth_section(build: Path, flat: Path, truth_path: Path, fields: list[str]) -> str:
    """Completeness against the simulation's truth (its primary objects in the run's fields), plotted."""
    truth = pd.read_parquet(truth_path)
    sel = truth["field"].isin(fields) if "field" in truth.columns else np.ones(len(truth), bool)
    if "is_primary" in truth.columns:
        sel &= truth["is_primary"].astype(bool)
    cat = pads.dataset(flat, format="parquet").to_table(columns=["ra", "dec"]).to_pandas()
    stats = completeness(truth[sel], cat)
    (build / "plots" / "completeness.json").write_text(json.dumps(stats, indent=1) + "\n")
    if stats:
        completeness_plot(stats, build / "plots" / "completeness.png")
    return _completeness(stats, truth_path, "completeness.png" if stats else None)


def _build(build: Path, run_dir: Path, summary: dict, fields: list[str], store_path: Path | None,
           inputs: Path | None, tables: list[Path] | None, stages: list[str] | None, top: int, max_fields: int,
           t0: float) -> None:
    """The report's files, in `build` (published whole by write_report)."""
    for sub in ("fields", "cutouts", "plots"):
        (build / sub).mkdir()
    sections, candidates = _candidate_sections(build, run_dir, summary, top)
    flat = _path(summary, "parquet", run_dir)
    fields_html = (_field_section(build, flat, store_path, fields, candidates, max_fields)
                   if store_path is not None and fields else "")
    truth_path = simulation_truth(inputs)
    truth_html = _truth_section(build, flat, truth_path, fields) if truth_path is not None and flat is not None else ""
    timings, n_rec = stage_timings(run_dir, tables or [])
    link = run_dir / REPORT_DIR
    files = " · ".join(x for x in (_link(_path(summary, k, run_dir), link) for k in ("hats", "parquet", "fits"))
                       if x)
    head = (f"<h1>deepfield review report</h1><p class=\"meta\">run <code>{_e(run_dir.name)}</code>: {len(fields)} "
            f"field(s), {summary.get('n_tiles', '?')} tile(s) merged, {len(summary.get('missing_tiles') or [])} "
            f"missing; {summary.get('rows_out', '?')} sources ({summary.get('field_duplicates_dropped', 0)} "
            f"duplicates of overlapping fields dropped); deepfield {_e(__version__)}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}</p><p>catalogs: {files}</p>")
    body = (head + fields_html + "".join(sections) + truth_html
            + _timings(timings, n_rec, summary.get("seconds"), list(stages or []))
            + f'<p class="meta">report written in {time.perf_counter() - t0:.1f} s</p>')
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
            f"<title>deepfield run {_e(run_dir.name)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")
    (build / "index.html").write_text(page, encoding="utf-8")
