"""Photometric redshifts from multi-band stamps and the catalog's photometry: the CNN of issue 23, after
Pasquet et al. (2019), beside the colour baseline of models/photoz.py.

Pasquet et al. classify SDSS ugriz stamps (64x64 px) into 180 redshift bins with an inception CNN, the galaxy's
reddening as an extra input to the fully connected layers, and take the softmax as p(z). This network keeps
that structure at the size two CPU cores can train in under an hour and run at the stage's budget:

- Input image: the stage's stamps (tasks/stages/photoz.py: stamps_nJy, 32x32 px centred on the detection,
  background-subtracted, nJy, unusable pixels 0), each band as arcsinh(pixel / pix_soft_b), pix_soft_b the
  typical per-pixel sky noise of that band in the training stamps (a buffer of the weights): noise near 1,
  bright cores compressed logarithmically.
- Extra input (the catalog's photometry, as Pasquet's reddening): per band the asinh magnitude of the
  aperture flux (softened at the reference's median flux error, as models/photoz.py), centred at 25 and
  divided by 2; the colour of every pair of bands divided by 0.5 mag (given rather than left to the layers to
  form: with them the held-out sigma_NMAD after 20 epochs on one field fell from 0.099 to 0.096); a flag that
  the band is there.
- Any subset of two or more of the trained bands: a band the survey lacks is a zero channel, a zero magnitude
  and a zero flag. Training drops random bands (`band_dropout` of the examples keep only a random two or more),
  so one set of weights serves every band set, each at its own accuracy (measured by `deepfield eval photoz`).
- Output: a softmax over `NBINS` redshift bins of width Z_MAX / NBINS. The p(z) summary is the same as the
  colour baseline's (models/photoz_pdf.py: five quantiles, uniform between them, so it integrates to one): the
  quantiles of the softmax's piecewise-linear CDF, widened about the median by `spread` (fitted on a held-out
  field so that 68 % intervals cover 68 %). z_phot is the median, z_phot_err half the 16-84 % width, and the
  flag bits are the baseline's.

Convolutions: a 5x5 of stride 2 (32 -> 16 px, `width` channels), two 3x3 at 16x16 (2 x width), 2x2 max
pooling, one 3x3 at 8x8 (4 x width), pooling; the 4x4 x (4 x width) map and the photometry go through fully
connected layers of 256 and 128. Width 8: 0.18 M parameters, 1.6 M multiply-adds per stamp, sized for the
stage's budget of 0.2 core-s per Mpx at about a thousand galaxies per Mpx.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .inference import scaled_asinh
from .photoz import FLAG_BANDS_MISSING, FLAG_BROAD, FLAG_LOW_SNR, FLAG_NO_ESTIMATE, asinh_mag, band_order
from .photoz_pdf import QUANTILE_COLUMNS, Z_MAX, quantiles_from_probs

__all__ = ["NBINS", "PhotoZCNN", "network_inputs", "band_probabilities", "quantiles_from_probs", "estimates", "for_inference"]

NBINS = 100
MAG_CENTRE, MAG_SCALE = 25.0, 2.0
COLOUR_SCALE = 0.5  # a colour of 0.5 mag is 1 at the input
# arcsec per pixel of the training stamps: `deepfield train photoz-cnn` measures fields of the simulator's default
# grid (tasks/trainsets/photoz.py); the stage resamples the stamps of a field on another grid onto it
TRAIN_PIXEL_SCALE = 0.2


class PhotoZCNN(nn.Module):
    def __init__(self, bands: list[str], size: int = 32, width: int = 8, nbins: int = NBINS, spread: float = 1.0,
                 flux_kind: str = "aper"):
        super().__init__()
        self.bands, self.size, self.width, self.nbins = band_order(bands), int(size), int(width), int(nbins)
        self.spread, self.flux_kind = float(spread), flux_kind
        nb, w = len(self.bands), self.width
        self.register_buffer("pix_soft", torch.ones(nb))  # nJy: typical per-pixel sky noise of each band
        self.register_buffer("flux_soft", torch.ones(nb, dtype=torch.float64))  # nJy: softening of the magnitudes

        def conv(a, b, k=3, stride=1):
            return [nn.Conv2d(a, b, k, stride=stride, padding=k // 2), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*conv(nb, w, 5, 2),  # 32 -> 16 px: the PSF (3-4 px FWHM) stays sampled
                                  *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
                                  *conv(2 * w, 4 * w), nn.MaxPool2d(2))
        flat = 4 * w * (self.size // 8) ** 2
        self.head = nn.Sequential(nn.Linear(flat + photometry_width(nb), 256), nn.ReLU(inplace=True),
                                  nn.Linear(256, 128), nn.ReLU(inplace=True), nn.Linear(128, self.nbins))

    def forward(self, image: torch.Tensor, phot: torch.Tensor) -> torch.Tensor:
        """Logits (n, nbins) of scaled stamps (n, bands, size, size) and photometry (n, photometry_width(bands))."""
        return self.head(torch.cat([self.conv(image).flatten(1), phot], dim=1))

    def bin_edges(self) -> np.ndarray:
        return np.linspace(0.0, Z_MAX, self.nbins + 1)


def network_inputs(model: PhotoZCNN, stamps: np.ndarray, flux: np.ndarray, present: np.ndarray, device=None
                   ) -> tuple[np.ndarray | torch.Tensor, np.ndarray]:
    """(image, photometry) float32 inputs of stamps (n, model bands, size, size) in nJy, aperture fluxes (n, model
    bands) in nJy and `present` (n, model bands) bool (a band the survey lacks, or whose flux is not finite, is
    False: zero channel, zero magnitude, zero flag). The image is a numpy array, or with a `device` other than the
    CPU a tensor computed there: one CPU thread's asinh of the pixels held an H200 to 7,000 stamps per second."""
    present = np.asarray(present, bool)
    image = scaled_asinh(stamps, model.pix_soft.detach().float().cpu().numpy(), device)  # models.inference
    if not present.all():
        image *= present[:, :, None, None] if isinstance(image, np.ndarray) else \
            torch.as_tensor(present).to(image.device)[:, :, None, None]
    soft = model.flux_soft.cpu().numpy()
    mu = asinh_mag(np.where(present, flux, 0.0), soft[None, :])
    mag = np.where(present, (mu - MAG_CENTRE) / MAG_SCALE, 0.0)
    pairs = _pairs(present.shape[1])
    both = pair_presence(present)
    col = np.stack([(mu[:, i] - mu[:, j]) / COLOUR_SCALE for i, j in pairs], axis=1) if pairs else both
    phot = np.concatenate([mag, np.where(both, col, 0.0), present.astype(float)], axis=1).astype(np.float32)
    return image, phot


def pair_presence(present: np.ndarray) -> np.ndarray:
    """(n, pairs) bool: both bands of each pair (_pairs order) present, of `present` (n, bands)."""
    pairs = _pairs(present.shape[1])
    return (np.stack([present[:, i] & present[:, j] for i, j in pairs], axis=1) if pairs
            else np.zeros((len(present), 0), bool))


def _pairs(nb: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(nb) for j in range(i + 1, nb)]


def photometry_width(nb: int) -> int:
    """Length of the photometry input of `nb` bands: magnitudes, colours of every pair, presence flags."""
    return 2 * nb + len(_pairs(nb))


def for_inference(model: PhotoZCNN, precision: str = "float32", device: str = "cpu") -> PhotoZCNN:
    """The model in eval mode with channels-last weights (the inputs of `probabilities` are channels-last): 35 %
    less CPU time per stamp on this machine's CPU (194 -> 124 us on one thread); with `precision` "bfloat16", or
    "auto" on a CPU that computes it natively, its convolutions under torch.autocast to bfloat16
    (models.inference.cpu_precision; the fully connected layers, a tenth of the time, stay in float32, as the
    softmax's input). `model.arithmetic` says which."""
    from .inference import cpu_precision
    model = model.eval().to(memory_format=torch.channels_last)
    model.arithmetic = cpu_precision(model, ("conv",), precision, device)
    return model


@torch.no_grad()
def probabilities(model: PhotoZCNN, image: np.ndarray | torch.Tensor, phot: np.ndarray, batch: int = 1024,
                  device: str = "cpu") -> np.ndarray:
    """Softmax p(z) per bin (n, nbins) of network inputs (network_inputs's)."""
    model.eval()
    out = []
    for s in range(0, len(image), batch):
        x = torch.as_tensor(image[s:s + batch]).to(device).contiguous(memory_format=torch.channels_last)
        logits = model(x, torch.from_numpy(phot[s:s + batch]).to(device))
        out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.nbins), np.float32)


def band_probabilities(model: PhotoZCNN, stamps: np.ndarray, flux: np.ndarray, bands: list[str], batch: int = 1024,
                       device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(probs (n, nbins), present (n, model bands)): the softmax p(z) of galaxies with stamps (n, len(bands), size,
    size) and aperture fluxes (n, len(bands)) in nJy, in the bands `bands` put in the model's band slots (those not
    among the model's are ignored; a non-finite flux makes its band absent, `present` False), and a row of NaN
    where fewer than two of the model's bands are present."""
    n, nb = len(flux), len(model.bands)
    st = np.zeros((n, nb, model.size, model.size), np.float32)
    fl = np.zeros((n, nb))
    present = np.zeros((n, nb), bool)
    for j, b in enumerate(model.bands):
        if b in bands:
            k = bands.index(b)
            st[:, j], fl[:, j] = stamps[:, k], flux[:, k]
            present[:, j] = np.isfinite(flux[:, k])
    fl = np.where(present, fl, 0.0)
    ok = present.sum(axis=1) >= 2
    probs = np.full((n, model.nbins), np.nan, np.float32)  # the softmax's own precision
    if ok.any():
        image, phot = network_inputs(model, st[ok], fl[ok], present[ok], device)
        probs[ok] = probabilities(model, image, phot, batch, device)
    return probs, present


def estimates(model: PhotoZCNN, stamps: np.ndarray, flux: np.ndarray, fluxerr: np.ndarray, bands: list[str],
              batch: int = 1024, device: str = "cpu", spread: float | None = None) -> dict[str, np.ndarray]:
    """The photo-z columns (z_phot, z_phot_err, the quantile columns, z_phot_flag: models/photoz.py) of galaxies
    with stamps (n, len(bands), size, size) and aperture fluxes and errors (n, len(bands)) in nJy, in the bands
    `bands` (those not among the model's are ignored; a non-finite flux makes its band absent)."""
    n = len(flux)
    out = {c: np.full(n, np.nan) for c in ("z_phot", "z_phot_err", *QUANTILE_COLUMNS)}
    flag = np.zeros(n, np.int16)
    probs, present = band_probabilities(model, stamps, flux, bands, batch, device)
    shared = [j for j, b in enumerate(model.bands) if b in bands]
    if shared:
        flag[~present[:, shared].all(axis=1)] |= FLAG_BANDS_MISSING
    ok = np.isfinite(probs).all(axis=1)
    flag[~ok] |= FLAG_NO_ESTIMATE
    if ok.any():
        q = quantiles_from_probs(probs[ok], model.bin_edges(), model.spread if spread is None else spread)
        for i, c in enumerate(QUANTILE_COLUMNS):
            out[c][ok] = q[:, i]
    if shared:  # S/N in i, else the reddest band the survey shares with the model
        refj = model.bands.index("i") if "i" in bands and "i" in model.bands else shared[-1]
        k = bands.index(model.bands[refj])
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = np.where(present[:, refj], flux[:, k] / fluxerr[:, k], np.nan)
    else:
        snr = np.full(n, np.nan)
    flag[ok & ~(snr >= 5)] |= FLAG_LOW_SNR
    out["z_phot"] = out["z_phot_q50"].copy()
    out["z_phot_err"] = 0.5 * (out["z_phot_q84"] - out["z_phot_q16"])
    flag[out["z_phot_err"] > 0.15 * (1 + out["z_phot"])] |= FLAG_BROAD
    out["z_phot_flag"] = flag
    return out
