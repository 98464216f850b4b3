"""Instrumental artefacts the anomaly scorer must find: satellite trails, cosmic rays, optical
ghosts, hot pixels and amplifier offsets.

Functions act in place on one band's float image (ny, nx) in ADU, in pixel coordinates (x =
column, y = row, pixel centres at integers). Each returns plain dicts (JSON-friendly) for the truth
catalog. `sample_field_artefacts` decides a field's artefacts deterministically from an rng;
`apply_artefacts` paints them band by band.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

def _check_image(image) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 2 or not np.issubdtype(image.dtype, np.floating):
        raise ValueError("image must be a 2-d floating-point numpy array (ny, nx)")


def _trail(x0, y0, x1, y1, sigma_pix, surface_brightness) -> dict:
    if not sigma_pix > 0 or not np.isfinite(surface_brightness) or surface_brightness < 0:
        raise ValueError("satellite trail: need sigma_pix > 0 and finite surface_brightness >= 0")
    if x0 == x1 and y0 == y1:
        raise ValueError("satellite trail: the two end points coincide")
    L = math.hypot(x1 - x0, y1 - y0)
    return dict(type="satellite_trail", x=(x0 + x1) / 2, y=(y0 + y1) / 2, x0=x0, y0=y0, x1=x1, y1=y1,
                sigma_pix=sigma_pix, surface_brightness=surface_brightness, amplitude=surface_brightness,
                length=L, npix=int(round(6 * sigma_pix * L)))


def _paint_trail(image, e, nsig=5.0) -> None:
    steep = abs(e["y1"] - e["y0"]) > abs(e["x1"] - e["x0"])
    img, (a0, b0, a1, b1) = ((image.T, (e["y0"], e["x0"], e["y1"], e["x1"])) if steep
                             else (image, (e["x0"], e["y0"], e["x1"], e["y1"])))
    nb, na = img.shape  # a runs along the trail's major direction (columns of img)
    sig, reach = e["sigma_pix"], nsig * e["sigma_pix"]
    cols = np.arange(max(0, math.floor(min(a0, a1) - reach)), min(na, math.ceil(max(a0, a1) + reach) + 1))
    da, db = a1 - a0, b1 - b0
    h = int(math.ceil(reach * math.hypot(1, db / da))) + 1
    rows = np.rint(b0 + (cols - a0) * db / da).astype(int)[:, None] + np.arange(-h, h + 1)[None, :]
    cc = np.broadcast_to(cols[:, None], rows.shape)
    t = np.clip(((cc - a0) * da + (rows - b0) * db) / (da**2 + db**2), 0, 1)  # nearest segment point
    d2 = (cc - a0 - t * da) ** 2 + (rows - b0 - t * db) ** 2
    ok = (rows >= 0) & (rows < nb) & (d2 <= reach**2)
    img[rows[ok], cc[ok]] += (e["surface_brightness"] * np.exp(-0.5 * d2[ok] / sig**2)).astype(image.dtype)


def add_satellite_trail(image: np.ndarray, x0: float, y0: float, x1: float, y1: float,
                        sigma_pix: float, surface_brightness: float) -> dict:
    """Add, in place, a straight trail from (x0, y0) to (x1, y1) (pixels) with a Gaussian
    cross-section of sigma `sigma_pix` pixels and peak `surface_brightness` ADU/pixel on its axis:
    it carries surface_brightness * sqrt(2 pi) * sigma_pix ADU per pixel of length. Only pixels
    within 5 sigma of the segment are touched (a strip, so 4096^2 images stay cheap)."""
    _check_image(image)
    e = _trail(*(float(v) for v in (x0, y0, x1, y1, sigma_pix, surface_brightness)))
    _paint_trail(image, e)
    return e


def _draw_cosmic_ray(rng, shape, sky_sigma, amp_range=(20.0, 500.0), worm_frac=0.4, max_length=15.0) -> dict:
    """Parameters of one cosmic ray (pixels); its pixels follow from them via _cosmic_ray_pixels."""
    worm = rng.uniform() < worm_frac
    L = float(rng.uniform(2.0, max_length)) if worm else 0.0
    ang = float(rng.uniform(0, 180))
    x0, y0 = float(rng.uniform(0, shape[1] - 1)), float(rng.uniform(0, shape[0] - 1))
    amp = float(np.exp(rng.uniform(*np.log(amp_range))) * sky_sigma)
    e = dict(type="cosmic_ray", shape="worm" if worm else "hit", x0=x0, y0=y0, length_pix=L,
             angle_deg=ang, amplitude=amp, seed=int(rng.integers(2**31)))
    ys, xs, _ = _cosmic_ray_pixels(e, shape)
    return dict(e, x=float(xs.mean()) if len(xs) else x0, y=float(ys.mean()) if len(ys) else y0, npix=len(xs))


def _cosmic_ray_pixels(cr: dict, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ys, xs, values ADU) of a cosmic-ray entry; deterministic from its parameters and seed."""
    r = np.random.default_rng(cr["seed"])
    A, L = cr["amplitude"], cr["length_pix"]
    if L < 1:  # single hit, sometimes spilling a little into 1-2 neighbours
        ix, iy, nb = round(cr["x0"]), round(cr["y0"]), int(r.integers(0, 3))
        off = np.array([(0, 1), (1, 0), (0, -1), (-1, 0)])[r.permutation(4)[:nb]]
        xs, ys = np.r_[ix, ix + off[:, 0]], np.r_[iy, iy + off[:, 1]]
        vals = np.r_[A, A * r.uniform(0.05, 0.3, nb)]
    else:  # worm: the pixels a straight track crosses, with fluctuating deposits
        s, a = np.arange(0.0, L + 1e-9, 0.25), math.radians(cr["angle_deg"])
        pts = np.unique(np.rint(np.c_[cr["x0"] + s * math.cos(a), cr["y0"] + s * math.sin(a)]).astype(int), axis=0)
        xs, ys, vals = pts[:, 0], pts[:, 1], A * r.uniform(0.4, 1.0, len(pts))
    ok = (xs >= 0) & (xs < shape[1]) & (ys >= 0) & (ys < shape[0])
    return ys[ok], xs[ok], vals[ok]


def add_cosmic_rays(image: np.ndarray, rng: np.random.Generator, n: int, sky_sigma: float,
                    amp_range: tuple[float, float] = (20.0, 500.0), worm_frac: float = 0.4,
                    max_length: float = 15.0) -> list[dict]:
    """Add, in place, n unconvolved cosmic rays: single/few-pixel hits and straight worms
    2-max_length pixels long at random angles, peak log-uniform in amp_range x sky_sigma ADU.
    Entries store a seed: `apply_artefacts` reproduces the same pixels."""
    _check_image(image)
    if n < 0 or not sky_sigma > 0 or not 0 < amp_range[0] <= amp_range[1] or not 0 <= worm_frac <= 1:
        raise ValueError("add_cosmic_rays: need n >= 0, sky_sigma > 0, 0 < amp_range[0] <= amp_range[1]")
    out = [_draw_cosmic_ray(rng, image.shape, sky_sigma, amp_range, worm_frac, max_length) for _ in range(int(n))]
    for e in out:
        _paint(image, e, "")
    return out


def _ghost(x, y, radius_pix, width_pix, amplitude, edge_pix=2.0) -> dict:
    if not (radius_pix > 0 and 0 < width_pix < 2 * radius_pix and edge_pix > 0 and amplitude >= 0):
        raise ValueError("ghost: need radius_pix > 0, 0 < width_pix < 2 radius_pix, edge_pix > 0, amplitude >= 0")
    return dict(type="ghost", x=x, y=y, radius_pix=radius_pix, width_pix=width_pix, edge_pix=edge_pix,
                amplitude=amplitude, flux=amplitude * 2 * np.pi * radius_pix * width_pix,
                npix=int(2 * np.pi * radius_pix * width_pix))


def add_ghost(image: np.ndarray, x: float, y: float, radius_pix: float, width_pix: float,
              amplitude: float, edge_pix: float = 2.0) -> dict:
    """Add, in place, an out-of-focus pupil ghost centred at (x, y) pixels: a flat annulus of mean
    radius radius_pix and radial width width_pix (its hole is the central obscuration),
    `amplitude` ADU/pixel on the flat part, edges smoothed by error-function ramps of sigma
    edge_pix. Entry's flux (ADU) is amplitude x annulus area."""
    _check_image(image)
    e = _ghost(*(float(v) for v in (x, y, radius_pix, width_pix, amplitude, edge_pix)))
    _paint(image, e, "")
    return e


def _hot_cluster(rng, shape) -> list[list[int]]:
    """1-4 edge-adjacent pixels [x, y] at a random place."""
    ny, nx = shape
    pix = [[int(rng.integers(0, nx)), int(rng.integers(0, ny))]]
    for _ in range(int(rng.integers(0, 4))):
        bx, by = pix[int(rng.integers(len(pix)))]
        dx, dy = [(1, 0), (-1, 0), (0, 1), (0, -1)][int(rng.integers(4))]
        p = [min(max(bx + dx, 0), nx - 1), min(max(by + dy, 0), ny - 1)]
        if p not in pix:
            pix.append(p)
    return pix


def _hot(rng, shape, amplitude_range) -> dict:
    pix = _hot_cluster(rng, shape)
    amp = float(np.exp(rng.uniform(*np.log(amplitude_range))))
    return dict(type="hot_pixels", x=float(np.mean([p[0] for p in pix])), y=float(np.mean([p[1] for p in pix])),
                pixels=pix, amplitude=amp, npix=len(pix))


def add_hot_pixels(image: np.ndarray, rng: np.random.Generator, n_clusters: int,
                   amplitude_range: tuple[float, float]) -> list[dict]:
    """Add, in place, n_clusters clusters of 1-4 edge-adjacent pixels ("pixels": [[x, y], ...]),
    each at a constant excess log-uniform in amplitude_range (ADU)."""
    _check_image(image)
    if n_clusters < 0 or not 0 < amplitude_range[0] <= amplitude_range[1]:
        raise ValueError("add_hot_pixels: need n_clusters >= 0 and 0 < amplitude_range[0] <= amplitude_range[1]")
    out = [_hot(rng, image.shape, amplitude_range) for _ in range(int(n_clusters))]
    for e in out:
        _paint(image, e, "")
    return out


def _amp(nx, ny, x_start, x_stop, offset, gradient) -> dict:
    if not 0 <= x_start < x_stop <= nx:
        raise ValueError(f"amp offset: need 0 <= x_start < x_stop <= {nx}, got {x_start}, {x_stop}")
    return dict(type="amp_offset", x=(x_start + x_stop - 1) / 2, y=(ny - 1) / 2, x_start=int(x_start),
                x_stop=int(x_stop), offset=float(offset), gradient=float(gradient), amplitude=float(offset),
                npix=int(ny * (x_stop - x_start)))


def add_amp_offset(image: np.ndarray, x_start: int, x_stop: int, offset: float, gradient: float = 0.0) -> dict:
    """Add, in place, offset + gradient * (y - (ny-1)/2) ADU (gradient in ADU per row) to the
    columns [x_start, x_stop): an amplifier with a bias/gain jump."""
    _check_image(image)
    e = _amp(image.shape[1], image.shape[0], x_start, x_stop, offset, gradient)
    _paint(image, e, "")
    return e


def _paint(image: np.ndarray, a: dict, band: str, rng=None) -> None:
    t = a.get("type")
    if t == "satellite_trail":
        _paint_trail(image, a)
    elif t == "cosmic_ray":
        if "seed" not in a:
            if rng is None:
                raise ValueError("apply_artefacts: a cosmic ray without seed needs an rng")
            a = dict(a, seed=int(rng.integers(2**31)))
        ys, xs, vals = _cosmic_ray_pixels(a, image.shape)
        image[ys, xs] += vals.astype(image.dtype)
    elif t == "ghost":
        amp = a.get("amplitude_by_band", {}).get(band, a["amplitude"])
        r_in, r_out, edge = a["radius_pix"] - a["width_pix"] / 2, a["radius_pix"] + a["width_pix"] / 2, a["edge_pix"]
        R, (ny, nx), x, y = r_out + 5 * edge, image.shape, a["x"], a["y"]
        y0, y1, x0, x1 = max(0, int(y - R)), min(ny, int(y + R) + 2), max(0, int(x - R)), min(nx, int(x + R) + 2)
        if y0 < y1 and x0 < x1:
            yy, xx = np.mgrid[y0:y1, x0:x1]
            r = np.hypot(xx - x, yy - y)
            image[y0:y1, x0:x1] += (amp * ndtr((r_out - r) / edge) * ndtr((r - r_in) / edge)).astype(image.dtype)
    elif t == "hot_pixels":
        p = np.asarray(a["pixels"], int)
        image[p[:, 1], p[:, 0]] += a["amplitude"]
    elif t == "amp_offset":
        ny = image.shape[0]
        ramp = a["offset"] + a.get("gradient", 0.0) * (np.arange(ny) - (ny - 1) / 2.0)
        image[:, a["x_start"]:a["x_stop"]] += ramp[:, None].astype(image.dtype)
    else:
        raise ValueError(f"apply_artefacts: unknown artefact type {t!r}")


def sample_field_artefacts(rng: np.random.Generator, cfg, shape: tuple[int, int], bands: list[str],
                           sky_sigma: dict[str, float], psf_sigma_pix: dict[str, float],
                           bright_stars: list[tuple[float, float, float]], field_id: int) -> list[dict]:
    """Decide one field's artefacts. cfg: ArtefactConfig; shape (ny, nx); sky_sigma (ADU) and
    psf_sigma_pix (pixels) per band; bright_stars: (x, y, flux) of the saturated stars, flux in
    ADU in the reference band (or a dict band -> ADU, giving each band its own ghost amplitude). Returns plain JSON-friendly dicts with anomaly_id (field_id*100000 + k),
    field_id, type, band (a band, or "all" for ghosts), x, y (pixels; midpoint for trails),
    amplitude, npix and the parameters `apply_artefacts` needs. Deterministic given rng."""
    ny, nx = shape
    missing = [b for b in bands if b not in sky_sigma or b not in psf_sigma_pix]
    if missing or ny < 8 or nx < 8 or not bands:
        raise ValueError(f"sample_field_artefacts: bad shape {shape}, no bands, or no sky_sigma/psf_sigma_pix for {missing}")
    out: list[dict] = []

    def push(entry, band):
        out.append(dict(entry, anomaly_id=int(field_id) * 100000 + len(out), band=band, field_id=int(field_id)))

    def edge_point(edge):
        t = rng.uniform()
        return [(t * (nx - 1), -0.5), (t * (nx - 1), ny - 0.5), (-0.5, t * (ny - 1)), (nx - 0.5, t * (ny - 1))][edge]

    for _ in range(int(rng.poisson(cfg.satellite_trails))):  # each trail in one band
        b = bands[int(rng.integers(len(bands)))]
        e1, e2 = rng.choice(4, 2, replace=False)
        (x0, y0), (x1, y1) = edge_point(e1), edge_point(e2)
        sb = float(np.exp(rng.uniform(np.log(2), np.log(50))) * sky_sigma[b])
        push(_trail(float(x0), float(y0), float(x1), float(y1), float(psf_sigma_pix[b]), sb), b)
    cx, cy, p = (nx - 1) / 2, (ny - 1) / 2, cfg.ghosts_per_bright_star
    for sx, sy, flux in bright_stars:  # ghosts offset from the star, away from the optical axis
        for _ in range(int(p) + int(rng.uniform() < p - int(p))):
            rad = float(rng.uniform(30, 80))
            width, k = rad * float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.05, 0.3))
            dx, dy = (sx - cx) * k, (sy - cy) * k
            if math.hypot(dx, dy) < 10:
                a = rng.uniform(0, 2 * np.pi)
                dx, dy = 10 * math.cos(a), 10 * math.sin(a)
            frac = float(np.exp(rng.uniform(np.log(1e-4), np.log(1e-3)))) / (2 * np.pi * rad * width)
            per_band = {b: float(f) * frac for b, f in flux.items()} if isinstance(flux, dict) else {}
            amp = float(np.mean(list(per_band.values()))) if per_band else float(flux) * frac
            e = dict(_ghost(float(sx + dx), float(sy + dy), rad, width, amp), star_x=float(sx), star_y=float(sy))
            push(dict(e, amplitude_by_band=per_band) if per_band else e, "all")
    for b in bands:
        for _ in range(int(cfg.cosmic_rays)):
            push(_draw_cosmic_ray(rng, shape, sky_sigma[b]), b)
        for _ in range(int(cfg.hot_pixel_clusters)):
            push(_hot(rng, shape, (30 * sky_sigma[b], 300 * sky_sigma[b])), b)
        if rng.uniform() < cfg.amp_artefact_prob:  # one of 4 amplifiers across the width
            namp = 4 if nx >= 64 else 1
            k = int(rng.integers(namp))
            off = float(rng.choice([-1, 1]) * rng.uniform(0.5, 3.0) * sky_sigma[b])
            push(_amp(nx, ny, k * nx // namp, (k + 1) * nx // namp, off, float(rng.uniform(-0.5, 0.5) * off / ny)), b)
    return out


def apply_artefacts(image: np.ndarray, band: str, artefacts: list[dict],
                    rng: np.random.Generator | None = None) -> None:
    """Paint, in place, the entries of `artefacts` whose band is `band` or "all" onto `image`
    (ny, nx) in ADU. Everything follows from the entries (cosmic rays from their seed), so rng
    is only used for cosmic-ray entries that lack a seed. A ghost may carry amplitude_by_band."""
    _check_image(image)
    for a in artefacts:
        if a.get("band") in (band, "all"):
            _paint(image, a, band, rng)
