"""The candidates' FITS cutouts with WCS (catalogs/cutouts.py) and the run's review report (catalogs/report.py):
the WCS of a cutout puts the candidate where the field puts it, on tiny synthetic stores (one with SIP
distortion) and on the session's run; the report lists the catalogs' candidates, its links are relative and
lead to files; and the page, loaded in a real headless Chromium over the DevTools protocol, logs no error, loads
every image, and leaves a screenshot in the run directory (RUN/report/screenshot.png, kept by CI).

Chromium: Debian's `chromium` package (.ci/run installs it); without it the browser test skips, unless
DEEPFIELD_REQUIRE_CHROMIUM=1 (CI), where it fails."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip

from deepfield.catalogs.cutouts import cutout_origin, read_cutout, write_cutouts
from deepfield.catalogs.report import LISTS, REPORT_TOP
from deepfield.tasks.fits_input import FieldImages
from deepfield.tasks.ingest_config import StoreSpec
from deepfield.tasks.zarr_store import open_store
from deepfield.tasks.zarr_write import write_field

N, SCALE = 200, 0.2


def _wcs(sip: bool) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [N / 2 + 0.5, N / 2 + 0.5]
    w.wcs.cd = np.array([[-np.cos(0.3), np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]) * SCALE / 3600  # rotated
    if sip:  # a strong distortion: 1.2 px at the corners
        a, b = np.zeros((3, 3)), np.zeros((3, 3))
        a[2, 0], b[0, 2], a[1, 1] = 6e-5, -6e-5, 3e-5
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Field "plain" (TAN, bands g r i) and field "sip" (TAN-SIP, band z alone), each pixel's value encoding
    its position: image[k, y, x] = 1000 k + y + x / 1000."""
    path = tmp_path_factory.mktemp("cut") / "store.zarr"
    root = open_store(path, mode="a")
    y, x = np.mgrid[0:N, 0:N].astype(np.float32)
    for name, bands, sip in (("plain", ["g", "r", "i"], False), ("sip", ["z"], True)):
        image = np.stack([1000 * k + y + x / 1000 for k in range(len(bands))]).astype(np.float32)
        header = _wcs(sip).to_header(relax=True)
        f = FieldImages(name=name, bands=bands, image=image, invvar=np.ones_like(image),
                        mask=np.zeros(image.shape, np.uint16), wcs_header=header, zeropoints=[27.0 + k for k in
                                                                                            range(len(bands))],
                        psf_fwhm=[1.0] * len(bands), pixel_scale=SCALE)
        write_field(root, f, StoreSpec(tile=64, chunk=32), {"inputs": name})
    return path


def test_cutout_wcs_puts_the_candidate_at_its_pixel(store, tmp_path):
    """For candidates inside fields and across their edges, with and without SIP: ra, dec from the field's WCS
    map through the cutout's WCS to (x - x0, y - y0) within 0.1 px, x0 = rint(x - (size - 1) / 2); the pixels
    are the field's (minus the cutout's median), NaN beyond the edges; the bands are named, the band axis counts
    them; the ROWS table keeps every cutout with its row."""
    size = 32
    pos = [("plain", 100.3, 57.8), ("plain", 3.2, 190.6), ("sip", 180.9, 4.4), ("sip", 21.5, 120.2)]
    rows = []
    for k, (f, x, y) in enumerate(pos):
        ra, dec = _wcs(f == "sip").pixel_to_world_values(x, y)
        rows.append(dict(lens_rank=k + 1, field=f, x=x, y=y, ra=float(ra), dec=float(dec),
                         source_id=pd.NA if k == 2 else 10 + k))
    rows = pd.DataFrame(rows).astype({"source_id": "Int64"})
    path = tmp_path / "cut.fits"
    assert write_cutouts(store, rows, path, "lens", "lens_rank", size, "test") == 4
    yy, xx = np.mgrid[0:size, 0:size]
    for r in rows.itertuples():
        c = read_cutout(path, f"LENS_{r.lens_rank}")
        x0, y0 = cutout_origin(r.x, r.y, size)
        assert (x0, y0) == (round(r.x - 15.5), round(r.y - 15.5))
        px, py = c.wcs.world_to_pixel_values(r.ra, r.dec)
        assert abs(px - (r.x - x0)) < 0.1 and abs(py - (r.y - y0)) < 0.1, (r, px, py)
        bands = ["z"] if r.field == "sip" else ["g", "r", "i"]
        assert list(c.planes) == bands and c.zeropoints == {b: 27.0 + k for k, b in enumerate(bands)}
        assert c.header["FIELD"] == r.field and c.header["CANDID"] == r.lens_rank
        fy, fx = yy + y0, xx + x0
        inside = (fy >= 0) & (fy < N) & (fx >= 0) & (fx < N)
        assert inside.sum() < size * size if r.lens_rank in (2, 3) else inside.all()
        for k, b in enumerate(bands):
            want = 1000 * k + fy + fx / 1000
            got = c.planes[b]
            assert np.isnan(got[~inside]).all() and abs(np.median(got[inside])) < 1e-3
            d = got[inside] - want[inside]
            np.testing.assert_allclose(d, d[0], atol=1e-3)  # the field's pixels minus one constant
        if r.field == "plain":  # the band axis: value k is BANDk
            w3 = WCS(c.header)
            assert w3.naxis == 3 and w3.wcs.ctype[2] == "BAND"
            assert w3.pixel_to_world_values(0, 0, 2)[2] == pytest.approx(3.0) and c.header["BAND3"] == "i"
        else:
            assert c.wcs.sip is not None and c.header["WCSAXES"] == 2  # SIP: astropy reads it in 2-D only
    # the report's pictures of them: a one-band field is grey, whatever its band
    from PIL import Image

    from deepfield.catalogs.report_images import cutout_pictures
    pics = cutout_pictures(path, ["LENS_1", "LENS_3", "LENS_9"], tmp_path, "lens")
    assert set(pics) == {"LENS_1", "LENS_3"}
    grey, colour = (np.asarray(Image.open(tmp_path / pics[k]), float) for k in ("LENS_3", "LENS_1"))
    assert grey.shape == colour.shape == (size, size, 3) and grey.std() > 0
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert np.abs(colour[..., 0] - colour[..., 2]).max() > 10  # g, r, i at different zero points: not grey
    with fits.open(path) as hdul:
        assert [h.name for h in hdul[1:-1]] == [f"LENS_{k}" for k in range(1, 5)]
        t = hdul["ROWS"].data
        assert list(t["lens_rank"]) == [1, 2, 3, 4] and list(t["source_id"]) == [10, 11, -1, 13]
        assert list(t["extname"]) == [f"LENS_{k}" for k in range(1, 5)] and hdul[0].header["NCUT"] == 4


# --- the session's run ----------------------------------------------------------------------------------------


def _report(run) -> Path:
    _, summary, _ = run
    return Path(summary["merge"]["paths"]["report"])


class _Page(HTMLParser):
    """The candidates (data-kind, data-id), images and links of the report."""

    def __init__(self):
        super().__init__()
        self.cands: list[tuple[str, int]] = []
        self.imgs: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and "data-kind" in a:
            self.cands.append((a["data-kind"], int(a["data-id"])))
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag in ("a", "link") and a.get("href") and not a["href"].startswith("data:"):
            self.links.append(a["href"])


def test_run_cutouts_carry_the_wcs_of_their_fields(default_run):
    """The run's lens and cluster cutouts and anomaly stamps: each candidate's ra, dec through its cutout's WCS
    lands at its catalog x, y in the cutout (within 0.1 px), and the cutout's pixels are the store's."""
    from deepfield.tasks.zarr_store import open_store as open_
    cfg, summary, _ = default_run
    paths = summary["merge"]["paths"]
    root = open_(cfg.store_path)
    for kind, (table_key, cut_key, id_col, prefix, *_rest) in LISTS.items():
        table = pd.read_parquet(paths[table_key])
        assert len(table) > 0, kind
        with fits.open(paths[cut_key]) as hdul:
            size = hdul[0].header["CUTSIZE"]
            assert hdul[0].header["NCUT"] == len(hdul) - 2
            for r in table.head(len(hdul) - 2).itertuples():
                hdu = hdul[f"{prefix}_{getattr(r, id_col)}"]
                x0, y0 = cutout_origin(r.x, r.y, size)
                px, py = WCS(hdu.header, naxis=2).world_to_pixel_values(r.ra, r.dec)
                assert abs(px - (r.x - x0)) < 0.1 and abs(py - (r.y - y0)) < 0.1, (kind, r)
                assert [hdu.header[f"BAND{j + 1}"] for j in range(hdu.data.shape[0])] == ["g", "r", "i", "z"]
                g = root["fields"][r.field]
                ys, xs = slice(max(y0, 0), y0 + size), slice(max(x0, 0), x0 + size)
                field = g["image"][1, ys, xs]
                cut = hdu.data[1, ys.start - y0:ys.start - y0 + field.shape[0],
                               xs.start - x0:xs.start - x0 + field.shape[1]]
                ok = np.isfinite(field)
                np.testing.assert_allclose((cut - field)[ok], np.nanmedian(cut - field), atol=1e-3)


def test_report_lists_the_candidates_of_the_catalogs(default_run):
    """One card per candidate of lens_candidates, anomalies and clusters, in their order, at most REPORT_TOP per
    list; every image and link is relative and leads to a file of the run; the pictures are PNGs."""
    _, summary, _ = default_run
    paths = summary["merge"]["paths"]
    index = _report(default_run)
    page = _Page()
    page.feed(index.read_text())
    for kind, (table_key, _, id_col, *_rest) in LISTS.items():
        ids = pd.read_parquet(paths[table_key])[id_col].tolist()
        assert [i for k, i in page.cands if k == kind] == ids[:REPORT_TOP], kind
    assert sum(k == "anomaly" for k, _ in page.cands) == min(REPORT_TOP, len(pd.read_parquet(paths["anomalies"])))
    assert len(page.imgs) >= len(page.cands) + 2 + 1  # a cutout each, two field previews, completeness
    for ref in page.imgs + page.links:
        assert "://" not in ref and not ref.startswith("/"), ref
        target = (index.parent / ref).resolve()  # a file, or a directory (the HATS catalog, the Parquet parts)
        assert target.exists() and target.is_relative_to(index.parent.parent.resolve()), ref
    for ref in page.imgs:
        assert (index.parent / ref).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", ref
    assert {"../catalogs/lens_cutouts.fits", "../catalogs/cluster_cutouts.fits",
            "../catalogs/anomaly_stamps.fits"} <= set(page.links)
    text = index.read_text()
    assert "Time per stage" in text and "Completeness" in text
    stats = json.loads((index.parent / "plots" / "completeness.json").read_text())
    assert set(stats) == {"g", "r", "i", "z"} and 23 < stats["i"]["m50"] < 27, stats["i"]


# --- the page in a headless Chromium ----------------------------------------------------------------------------


def _chromium() -> str:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    if exe is None:
        if os.environ.get("DEEPFIELD_REQUIRE_CHROMIUM") == "1":
            pytest.fail("DEEPFIELD_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium; CI sets DEEPFIELD_REQUIRE_CHROMIUM=1)")
    return exe


class DevTools:
    """A minimal Chrome DevTools Protocol client over one websocket: commands, and the events seen meanwhile."""

    def __init__(self, url: str):
        from websockets.sync.client import connect
        self.ws = connect(url, max_size=None, open_timeout=30)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, timeout: float = 60.0, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps(dict(id=self.next_id, method=method, params=params)))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01))))
        return next(e for e in self.events if e.get("method") == method)

    def drain(self, seconds: float) -> None:
        """Collect the events that arrive within `seconds` (late console messages)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                break


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium started for the test, its DevTools port read from DevToolsActivePort."""
    profile = tmp_path / "profile"
    proc = subprocess.Popen([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,1600",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and len(active.read_text().split()) >= 2):
            if proc.poll() is not None:
                pytest.fail(f"chromium exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("chromium wrote no DevToolsActivePort within 60 s")
            time.sleep(0.1)
        port = int(active.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        cdp = DevTools(page["webSocketDebuggerUrl"])
        yield cdp
        cdp.ws.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the browser we started, and its helper processes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_report_loads_in_a_browser_without_errors(default_run, browser):
    """file://RUN/report/index.html in headless Chromium: no console error, no uncaught exception, no failed
    load, every <img> complete with a natural width; its screenshot is kept in the report's directory."""
    index = _report(default_run)
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable")
    browser.send("Page.navigate", url=index.resolve().as_uri())
    browser.wait_for("Page.loadEventFired")
    browser.drain(0.5)
    errors = [e for e in browser.events if
              (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
              or e.get("method") in ("Runtime.exceptionThrown", "Network.loadingFailed")]
    assert not errors, errors
    images = browser.send("Runtime.evaluate", returnByValue=True, expression=(
        "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"))
    images = images["result"]["value"]
    page = _Page()
    page.feed(index.read_text())
    assert len(images) == len(page.imgs) > 0
    bad = [i for i in images if not (i[1] and i[2] > 0)]
    assert not bad, bad
    shot = browser.send("Page.captureScreenshot", format="png")
    png = base64.b64decode(shot["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (index.parent / "screenshot.png").write_bytes(png)
    if os.environ.get("DEEPFIELD_CI_ARTIFACTS"):  # .ci/run: a copy where CI collects its artifacts
        out = Path(os.environ["DEEPFIELD_CI_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "report-screenshot.png").write_bytes(png)
