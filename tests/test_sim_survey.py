"""The simulated survey against its own truth: geometry, noise, photometry, populations, lenses."""
from __future__ import annotations

import galsim
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from photutils.aperture import CircularAnnulus, CircularAperture, ApertureStats, aperture_photometry

from deepfield.tasks import maskbits


def _open(survey, rel):
    with fits.open(survey / rel) as hdul:
        return hdul[0].data.astype(np.float64), hdul[0].header


@pytest.fixture(scope="module")
def truth(survey):
    return {t: pd.read_parquet(survey / "truth" / f"{t}.parquet")
            for t in ("objects", "clusters", "lenses", "anomalies")}


def test_manifest_lists_every_file(survey, manifest, survey_cfg):
    assert len(manifest["fields"]) == survey_cfg.fields
    for f in manifest["fields"]:
        assert sorted(f["bands"]) == sorted(survey_cfg.bands)
        for b, entry in f["bands"].items():
            for kind in ("image", "invvar", "mask"):
                data, hdr = _open(survey, entry[kind])
                assert data.shape == (survey_cfg.size, survey_cfg.size)
                assert hdr["BAND"] == b
    for rel in manifest["truth"].values():
        assert (survey / rel).exists()


def test_wcs_round_trip_every_field(survey, manifest):
    rng = np.random.default_rng(0)
    for f in manifest["fields"]:
        for entry in f["bands"].values():
            _, hdr = _open(survey, entry["image"])
            w = WCS(hdr)
            x, y = rng.uniform(-0.5, hdr["NAXIS1"] - 0.5, (2, 500))
            sky = w.pixel_to_world(x, y)
            x2, y2 = w.world_to_pixel(sky)
            assert np.max(np.hypot(x2 - x, y2 - y)) < 1e-6
            # pixel scale and orientation: north up, east left, 0.2"/px
            c0, cx, cy = w.pixel_to_world([500, 501, 500], [500, 500, 501])
            assert c0.separation(cx).arcsec == pytest.approx(hdr["PIXSCALE"], rel=1e-4)
            assert cx.ra.deg < c0.ra.deg and cy.dec.deg > c0.dec.deg
            assert w.pixel_to_world(*(np.array(f["shape"][::-1]) - 1) / 2).separation(
                __import__("astropy.coordinates", fromlist=["SkyCoord"]).SkyCoord(f["ra"], f["dec"], unit="deg")
            ).arcsec < 1e-6


def test_every_truth_object_lies_in_its_field(survey, manifest, truth):
    obj = truth["objects"]
    for f in manifest["fields"]:
        rows = obj[obj.field == f["name"]]
        assert len(rows) > 100
        size = f["shape"][0]
        assert rows.x.between(-0.5, size - 0.5).all() and rows.y.between(-0.5, size - 0.5).all()
        _, hdr = _open(survey, next(iter(f["bands"].values()))["image"])
        x, y = WCS(hdr).all_world2pix(rows.ra, rows.dec, 0)
        assert np.max(np.hypot(x - rows.x, y - rows.y)) < 1e-6


def test_overlapping_fields_share_objects_and_one_owns_each(truth, survey_cfg):
    obj = truth["objects"]
    per_id = obj.groupby("id")
    in_two = per_id.size()
    shared = in_two[in_two == 2].index
    # the fields overlap by `overlap` arcsec: expect about overlap/width of each field's objects shared
    frac = len(shared) / obj.groupby("field").size().mean()
    assert 0.3 * survey_cfg.overlap / survey_cfg.field_width_arcsec < frac < 3 * survey_cfg.overlap / survey_cfg.field_width_arcsec
    assert (per_id["is_primary"].sum() == 1).all()  # exactly one owner per object


def test_invvar_matches_empty_sky_noise(survey, manifest, truth):
    """Robust pixel noise of source-free sky against 1/sqrt(invvar), per 128 px block, per band."""
    obj = truth["objects"]
    for f in manifest["fields"]:
        rows = obj[obj.field == f["name"]]
        for b, entry in f["bands"].items():
            img, _ = _open(survey, entry["image"])
            ivar, _ = _open(survey, entry["invvar"])
            mask, _ = _open(survey, entry["mask"])
            n = img.shape[0]
            yy, xx = np.mgrid[0:n, 0:n]
            clear = (mask == 0) & (ivar > 0)
            for _, s in rows.iterrows():  # keep clear of every simulated source
                r = 5 + 4 * s.hlr / 0.2 + 6 * max(0.0, 24.0 - s[f"mag_{b}"]) ** 1.5
                y0, y1 = int(max(s.y - r, 0)), int(min(s.y + r + 1, n))
                x0, x1 = int(max(s.x - r, 0)), int(min(s.x + r + 1, n))
                clear[y0:y1, x0:x1] &= (xx[y0:y1, x0:x1] - s.x) ** 2 + (yy[y0:y1, x0:x1] - s.y) ** 2 > r * r
            ratios = []
            for by in range(0, n, 128):
                for bx in range(0, n, 128):
                    sel = clear[by:by + 128, bx:bx + 128]
                    if sel.sum() < 2000:
                        continue
                    pix = img[by:by + 128, bx:bx + 128][sel]
                    sigma = 1.4826 * np.median(np.abs(pix - np.median(pix)))
                    expected = np.median(1 / np.sqrt(ivar[by:by + 128, bx:bx + 128][sel]))
                    ratios.append(sigma / expected)
            assert len(ratios) >= 10, f"too few clear sky blocks in {f['name']} {b}"
            ratios = np.array(ratios)
            assert np.all(np.abs(ratios - 1) < 0.1), (f["name"], b, ratios.min(), ratios.max())


def moffat_enclosed(r_arcsec: float, fwhm: float, beta: float) -> float:
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    return 1 - (1 + (r_arcsec / alpha) ** 2) ** (1 - beta)


def test_point_source_magnitudes_recovered_by_aperture_photometry(survey, manifest, truth, survey_cfg):
    obj = truth["objects"]
    n_checked = 0
    for f in manifest["fields"]:
        rows = obj[obj.field == f["name"]]
        others = rows[["x", "y"]].to_numpy()
        for b, entry in f["bands"].items():
            img, hdr = _open(survey, entry["image"])
            mask, _ = _open(survey, entry["mask"])
            fwhm, beta, scale = hdr["PSF_FWHM"], hdr["PSFBETA"], hdr["PIXSCALE"]
            r_ap = 3 * fwhm / scale
            stars = rows[(rows.kind == "star") & (rows[f"snr_{b}"] > 500)
                         & (rows[f"mag_{b}"] > survey_cfg.saturation_mag + 0.7)
                         & rows.x.between(40, img.shape[1] - 40) & rows.y.between(40, img.shape[0] - 40)]
            for _, s in stars.iterrows():
                d = np.hypot(others[:, 0] - s.x, others[:, 1] - s.y)
                near = rows[(d > 0) & (d < 2.5 * r_ap)]
                if (near[f"mag_{b}"] < s[f"mag_{b}"] + 6).any():
                    continue  # a neighbour within reach would bias the aperture
                ap = CircularAperture((s.x, s.y), r=r_ap)
                if mask[int(s.y) - 20:int(s.y) + 21, int(s.x) - 20:int(s.x) + 21].any():
                    continue
                ann = CircularAnnulus((s.x, s.y), r_in=2 * r_ap, r_out=3 * r_ap)
                bkg = ApertureStats(img, ann).median
                flux = aperture_photometry(img, ap)["aperture_sum"][0] - bkg * ap.area
                flux /= moffat_enclosed(r_ap * scale, fwhm, beta)
                mag = hdr["MAGZERO"] - 2.5 * np.log10(flux)
                assert abs(mag - s[f"mag_{b}"]) < 0.05, (f["name"], b, s.id, mag, s[f"mag_{b}"])
                n_checked += 1
    assert n_checked >= 8


def test_galaxy_number_counts(truth, survey_cfg):
    obj = truth["objects"]
    gal = obj[obj.is_primary & (obj.kind == "galaxy") & (obj.cluster_id < 0)]
    area = survey_cfg.fields * (survey_cfg.field_width_arcsec / 60) ** 2 - \
        (survey_cfg.fields - 1) * survey_cfg.overlap * survey_cfg.field_width_arcsec / 3600
    density_25 = (gal.mag_i < 25).sum() / area
    assert 20 < density_25 < 80  # tens per arcmin^2 to i = 25
    edges = np.arange(20.0, 25.51, 0.5)
    counts, _ = np.histogram(gal.mag_i, edges)
    slope = np.polyfit(0.5 * (edges[1:] + edges[:-1]), np.log10(counts), 1, w=np.sqrt(counts))[0]
    assert 0.25 < slope < 0.40  # deep i-band counts: 0.3-0.35 (e.g. HSC, Capak et al. 2004)


def test_cluster_members_over_dense_at_centre(truth):
    """Red-sequence members brighter than m* + 2 crowd the core far above field galaxies of the same
    magnitudes and colours (the contrast a red-sequence cluster finder works with)."""
    obj, clusters = truth["objects"], truth["clusters"]
    assert len(clusters) >= 1
    field_gal = obj[(obj.kind == "galaxy") & (obj.cluster_id < 0) & obj.is_primary]
    area_field = (1024 * 0.2) ** 2
    for _, c in clusters.iterrows():
        mem = obj[(obj.cluster_id == c.cluster_id) & (obj.field == c.field)]
        assert (mem.kind == "bcg").sum() == 1
        cut = c.m_star + 2.0
        bcg = mem[mem.kind == "bcg"].iloc[0]
        red_seq = bcg.mag_g - bcg.mag_i

        def on_sequence(t):
            return (t.mag_i < cut) & (np.abs(t.mag_g - t.mag_i - red_seq) < 0.2)
        r = np.hypot(mem.x - c.x, mem.y - c.y) * 0.2
        r_core = 0.2 * c.r_lambda_arcsec
        # the part of the core circle inside the field, by counting pixels
        yy, xx = np.mgrid[0:1024:4, 0:1024:4]
        core_area = np.mean(np.hypot(xx - c.x, yy - c.y) * 0.2 < r_core) * area_field
        core_density = ((r < r_core) & on_sequence(mem)).sum() / core_area
        bg = field_gal[(field_gal.field == c.field) & on_sequence(field_gal)]
        bg_density = len(bg) / area_field
        assert core_density > 5 * max(bg_density, 1 / area_field), (c.cluster_id, core_density, bg_density)
        # members share the red-sequence colour of their redshift: small g - i scatter
        bright = mem[mem.mag_i < cut]
        assert (bright.mag_g - bright.mag_i).std() < 0.15


def test_lensed_arcs_in_pixels(survey, manifest, truth):
    """Around each lens, the image minus a model of the deflector holds arc flux at theta_E."""
    lenses = truth["lenses"]
    checked = 0
    for _, L in lenses[(lenses.arc_snr_g > 30) & (lenses.theta_e > 1.0)].iterrows():
        f = next(f for f in manifest["fields"] if f["name"] == L.field)
        img, hdr = _open(survey, f["bands"]["g"]["image"])
        if not (30 < L.x < img.shape[1] - 30 and 30 < L.y < img.shape[0] - 30):
            continue
        psf = galsim.Moffat(beta=hdr["PSFBETA"], fwhm=hdr["PSF_FWHM"])
        defl = galsim.DeVaucouleurs(half_light_radius=L.defl_hlr,
                                    flux=10 ** (-0.4 * (L.mag_defl_g - hdr["MAGZERO"])))
        defl = defl.shear(q=L.defl_q, beta=(90 + L.pa) * galsim.degrees)
        stamp = galsim.ImageF(galsim.BoundsI(int(L.x) - 24, int(L.x) + 26, int(L.y) - 24, int(L.y) + 26),
                              scale=hdr["PIXSCALE"])
        galsim.Convolve(defl, psf).drawImage(stamp, center=galsim.PositionD(L.x + 1, L.y + 1))
        b = stamp.bounds
        resid = img[b.ymin - 1:b.ymax, b.xmin - 1:b.xmax] - stamp.array
        yy, xx = np.mgrid[b.ymin - 1:b.ymax, b.xmin - 1:b.xmax]
        r = np.hypot(xx - L.x, yy - L.y) * hdr["PIXSCALE"]
        ring = np.abs(r - L.theta_e) < 0.5
        arc_flux = resid[ring].sum()
        expected = 10 ** (-0.4 * (L.mag_arc_g - hdr["MAGZERO"]))
        assert arc_flux > 0.3 * expected, (L.lens_id, arc_flux, expected)
        checked += 1
    assert checked >= 1


def test_saturated_stars_masked_with_bleed_trails(survey, manifest, truth, survey_cfg):
    obj = truth["objects"]
    found = 0
    for f in manifest["fields"]:
        mask, _ = _open(survey, f["bands"]["i"]["mask"])
        mask = mask.astype(np.uint16)
        img, hdr = _open(survey, f["bands"]["i"]["image"])
        bright = obj[(obj.field == f["name"]) & (obj.kind == "star") & (obj.mag_i < survey_cfg.saturation_mag - 1)]
        for _, s in bright.iterrows():
            ix, iy = int(round(s.x)), int(round(s.y))
            assert mask[iy, ix] & maskbits.SAT
            assert img[iy, ix] == pytest.approx(hdr["SATURATE"], rel=1e-5)
            col = mask[:, ix]
            assert (col & maskbits.BLEED).any()  # charge bled along the column
            found += 1
    assert found >= 1


def test_anomalies_recorded(truth):
    kinds = set(truth["anomalies"].type)
    assert {"cosmic_ray", "hot_pixels", "ring_galaxy", "merger"} <= kinds
