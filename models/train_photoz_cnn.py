"""Training of the photo-z CNN (`deepfield train photoz-cnn`, models/photoz_cnn.py) on the galaxies of the
photo-z reference set's simulated fields with their stamps (tasks/trainsets/photoz.py: seed_tables with
stamps, the same fields and measuring stages as the colour baseline's).

- Data: each seed's matched galaxies (fluxes of one photometry in nJy, Gaussian apertures by default; true z,
  true i magnitude) and their 32x32 stamps in nJy. The last seed's field is held out: the spread of the
  intervals is fitted on it and the figures are measured on it, beside the colour baseline's on the same field
  (fitted on the same other seeds).
- Inputs are scaled once (models/photoz_cnn.py: network_inputs). Each batch is turned by a random multiple of
  90 degrees and flipped at random (a galaxy's redshift does not depend on its orientation), and `band_dropout`
  of its examples keep only a random two or more of the bands (zero channel, magnitude and flag for the others).
- Loss: cross-entropy of the softmax over the redshift bins against the true z's bin, Adam with a cosine
  schedule, `epochs` passes over the training galaxies.
- Checkpoints (models/checkpoint.py) after every epoch: a killed run resumes there with `--checkpoint`; the
  same seed and configuration give the same weights.
- Record: arch (bands, size, width, nbins, spread), the data, the loss per epoch, the held-out figures by
  magnitude and by band set, with the colour baseline's beside them, and the command line.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, save_checkpoint
from .photoz import band_order
from .photoz_pdf import QUANTILE_COLUMNS, Z_MAX, binned_figures, fit_spread
from .photoz_cnn import TRAIN_PIXEL_SCALE, PhotoZCNN, estimates, network_inputs, pair_presence
from .progress import say
from .train_photoz import usable_mask

__all__ = ["train", "BAND_SETS"]

# band sets measured on the held-out field (those of the model's bands a survey may have)
BAND_SETS = (("g", "r", "i", "z"), ("g", "r", "z"), ("g", "r", "i"), ("r", "i", "z"), ("r", "i"), ("g", "r"))


def pixel_noise(stamps: np.ndarray, frame: int = 3, n: int = 4000, seed: int = 0) -> np.ndarray:
    """(bands,) typical per-pixel sky noise of stamps (n, bands, s, s): 1.4826 x the MAD of the outer `frame`
    pixels of up to `n` stamps, per band, zeros (unusable pixels) left out."""
    rng = np.random.default_rng(seed)
    pick = stamps[rng.choice(len(stamps), min(n, len(stamps)), replace=False)]
    s = stamps.shape[-1]
    edge = np.ones((s, s), bool)
    edge[frame:s - frame, frame:s - frame] = False
    out = []
    for b in range(stamps.shape[1]):
        v = pick[:, b][:, edge].ravel()
        v = v[v != 0]
        out.append(1.4826 * np.median(np.abs(v - np.median(v))) if v.size else 1.0)
    return np.asarray(out, np.float32)


class _Rows:
    """The usable rows of the training fields' stamps read as one (rows, bands, s, s) array by `len`, `shape`,
    indexing with an array of rows and `chunks`, without concatenating them or holding more than one field's
    rows in memory at a time (the fields' stamp files are memory-mapped): `stamps` (one (n_i, bands, s, s) array
    per field), `keep` (one (n_i,) bool per field, the rows used) and `order` (the bands' order in the model)."""

    def __init__(self, stamps: list[np.ndarray], keep: list[np.ndarray], order: list[int]):
        self.stamps, self.order = stamps, list(order)
        self.index = [np.flatnonzero(k) for k in keep]
        self.offsets = np.cumsum([0] + [len(i) for i in self.index])
        self.shape = (int(self.offsets[-1]), len(self.order)) + tuple(stamps[0].shape[2:])

    def __len__(self) -> int:
        return self.shape[0]

    def _field(self, k: int, rows) -> np.ndarray:
        return np.asarray(np.asarray(self.stamps[k][self.index[k][rows]])[:, self.order], np.float32)

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows),) + self.shape[1:], np.float32)
        for k in np.unique(part):
            sel = part == k
            out[sel] = self._field(k, rows[sel] - self.offsets[k])
        return out

    def chunks(self):
        """(first row, array) of each field's usable rows in order, read when asked for."""
        for k, start in enumerate(self.offsets[:-1].tolist()):
            yield start, self._field(k, slice(None))


def _subset_mask(rng: np.random.Generator, n: int, nb: int, dropout: float) -> np.ndarray:
    """(n, nb) bool: all bands, or for `dropout` of the rows a random subset of two or more."""
    mask = np.ones((n, nb), bool)
    for r in np.flatnonzero(rng.random(n) < dropout):
        k = rng.integers(2, nb) if nb > 2 else 2
        mask[r] = False
        mask[r, rng.choice(nb, k, replace=False)] = True
    return mask


def network_inputs_masked(phot: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The photometry inputs (models/photoz_cnn.py: network_inputs, every band present) as they would be with
    only the bands `mask` (n, bands) present: magnitudes, colours of pairs with a band absent and flags
    zeroed."""
    nb = mask.shape[1]
    both = pair_presence(mask)
    return np.concatenate([phot[:, :nb] * mask, phot[:, nb:nb + both.shape[1]] * both, mask], axis=1
                          ).astype(np.float32)


def _figures(model: PhotoZCNN, t: pd.DataFrame, stamps: np.ndarray, bands: list[str]) -> dict:
    cols = [model.bands.index(b) for b in bands]
    res = estimates(model, stamps[:, cols], t[[f"flux_{b}" for b in bands]].to_numpy(float),
                    t[[f"fluxerr_{b}" for b in bands]].to_numpy(float), list(bands))
    q = np.stack([res[c] for c in QUANTILE_COLUMNS], axis=1)
    return binned_figures(res["z_phot"], q, t.z.to_numpy(float), t.mag_true.to_numpy(float))


def train(command: str, tables: list[pd.DataFrame], stamps: list[np.ndarray], seeds: list[int], epochs: int = 40,
          width: int = 8, nbins: int = 100, batch: int = 128, lr: float = 2e-3, band_dropout: float = 0.2, seed: int = 0,
          checkpoint: Path | None = None, stop_after: int | None = None, baseline: dict | None = None,
          flux_kind: str = "aper", field_size: int = 2048) -> tuple[dict, dict] | None:
    """(record, state) of a CNN trained on every seed's galaxies but the last one's (module docstring); None when
    stopped by `stop_after` epochs (the checkpoint holds the run). `baseline`: the colour baseline's held-out
    figures on the same field, kept in the record for the comparison. `flux_kind`: the measure stage's photometry
    the tables' `flux_<band>` columns hold (`flux_<kind>_<band>`), recorded so the stage feeds the same.
    `field_size`: the side of the simulated fields, for the record."""
    if len(tables) < 2:
        raise ValueError("train photoz-cnn: give at least two seeds (the last one's field is held out)")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    have = [c[len("flux_"):] for c in tables[0].columns if c.startswith("flux_")]
    bands = band_order(have)
    order = [have.index(b) for b in bands]
    keep = [usable_mask(t, bands) for t in tables]
    train_t = pd.concat([t[k] for t, k in zip(tables[:-1], keep[:-1])], ignore_index=True)
    train_s = _Rows(stamps[:-1], keep[:-1], order)
    held_t = tables[-1][keep[-1]].reset_index(drop=True)
    held_s = stamps[-1][keep[-1]][:, order]
    size = train_s.shape[-1]
    say(f"train photoz-cnn: {len(train_t)} galaxies from seeds {seeds[:-1]}, held out {len(held_t)} (seed "
        f"{seeds[-1]}), bands {','.join(bands)}, stamps {size}x{size}")
    model = PhotoZCNN(bands, size=size, width=width, nbins=nbins, flux_kind=flux_kind)
    model.pix_soft.copy_(torch.from_numpy(pixel_noise(train_s, seed=seed)))
    model.flux_soft.copy_(torch.from_numpy(np.median(train_t[[f"fluxerr_{b}" for b in bands]].to_numpy(float),
                                                     axis=0)))
    flux = train_t[[f"flux_{b}" for b in bands]].to_numpy(float)
    # the network's inputs seed by seed into one array: the stamps of 100 fields are 7 GB, and scaling them at
    # once (the asinh's temporaries) ran a 24 GB machine out of memory; the values are the same row by row
    image = np.empty((len(train_t), len(bands), size, size), np.float32)
    phots = []
    for start, part in train_s.chunks():
        rows = slice(start, start + len(part))
        image[rows], p = network_inputs(model, part, flux[rows], np.ones((len(part), len(bands)), bool))
        phots.append(p)
    phot = np.concatenate(phots)
    del train_s, phots
    nb = len(bands)
    target = np.clip((train_t.z.to_numpy(float) / Z_MAX * model.nbins).astype(np.int64), 0, model.nbins - 1)
    steps_per_epoch = len(image) // batch
    config = dict(bands=bands, size=size, width=width, nbins=nbins, flux_kind=flux_kind, batch=batch, lr=lr,
                  band_dropout=band_dropout, seed=seed,
                  epochs=epochs, steps=epochs * steps_per_epoch, n=len(image))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    state = load_checkpoint(checkpoint, config, model, opt, sched) or {}
    start, history = int(state.get("epoch", 0)), list(state.get("history", []))
    if "rng" in state:
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
    t0 = time.perf_counter()
    for epoch in range(start, epochs):
        model.train()
        perm = rng.permutation(len(image))
        losses = []
        for s in range(steps_per_epoch):
            idx = np.sort(perm[s * batch:(s + 1) * batch])
            mask = _subset_mask(rng, len(idx), nb, band_dropout)
            x = torch.from_numpy(image[idx] * mask[:, :, None, None])
            p = torch.from_numpy(network_inputs_masked(phot[idx], mask))
            k = int(rng.integers(4))
            x = torch.rot90(x, k, dims=(2, 3))
            if rng.random() < 0.5:
                x = torch.flip(x, dims=(3,))
            loss = F.cross_entropy(model(x, p), torch.from_numpy(target[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            f = _figures(model, held_t, held_s, bands)["i_lt_24"]
        history.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4),
                        "held_out_sigma_nmad_i_lt_24": round(f["sigma_nmad"], 4),
                        "held_out_outliers_i_lt_24": round(f["outliers"], 4)})
        say(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}, held out i < 24 sigma_NMAD "
            f"{f['sigma_nmad']:.4f}, outliers {f['outliers']:.3f} ({time.perf_counter() - t0:.0f} s)")
        if checkpoint is not None:
            save_checkpoint(checkpoint, config, model, opt, sched, step=(epoch + 1) * steps_per_epoch,
                            epoch=epoch + 1, history=history, rng=rng.bit_generator.state,
                            torch_rng=torch.get_rng_state())
        if stop_after is not None and epoch + 1 - start >= stop_after and epoch + 1 < epochs:
            say(f"stopped after {stop_after} epoch(s); resume with the same command")
            return None
    model.eval()
    # the spread of the intervals, on the held-out field's galaxies at true i < 25 with every band
    from .photoz_cnn import probabilities, quantiles_from_probs
    bright = held_t.mag_true.to_numpy(float) < 25
    himg, hphot = network_inputs(model, held_s[bright], held_t[[f"flux_{b}" for b in bands]].to_numpy(float)[bright],
                                 np.ones((bright.sum(), nb), bool))
    probs = probabilities(model, himg, hphot)
    model.spread = fit_spread(lambda sp: quantiles_from_probs(probs, model.bin_edges(), sp),
                              held_t.z.to_numpy(float)[bright])
    held = _figures(model, held_t, held_s, bands)
    by_set = {",".join(bs): _figures(model, held_t, held_s, list(bs))["i_lt_24"]
              for bs in BAND_SETS if all(b in bands for b in bs)}
    f = held["i_lt_24"]
    say(f"spread {model.spread}: held out i < 24 sigma_NMAD {f['sigma_nmad']:.4f}, outliers {f['outliers']:.3f}, "
        f"bias {f['bias']:+.4f}, 68 % coverage {f['coverage_68']:.3f}")
    arch = {"bands": bands, "size": size, "width": width, "nbins": model.nbins, "spread": model.spread,
            "flux_kind": flux_kind}
    record = {"arch": arch, "command": command, "seed": int(seed), "seeds": [int(s) for s in seeds],
              "config": {k: v for k, v in config.items() if k not in ("bands", "size", "width", "nbins", "flux_kind")},
              "data": {"fields": len(seeds), "field_size": int(field_size), "train_galaxies": int(len(train_t)),
                       "held_out_galaxies": int(len(held_t)), "held_out_seed": int(seeds[-1]),
                       "photometry": f"flux_{flux_kind}_<band>", "stamps": f"{size}x{size} px, nJy",
                       "pixel_scale": TRAIN_PIXEL_SCALE},
              "history": history, "train_seconds": round(time.perf_counter() - t0, 1),
              "metrics": {"held_out": held, "held_out_band_sets_i_lt_24": by_set,
                          "colour_baseline_held_out": baseline or {}}}
    return record, model.state_dict()
