"""Training the photo-z CNN (`deepfield train photoz-cnn`, models/train_photoz_cnn.py) on synthetic seeds with a
known colour-redshift relation (tests/_photoz_synthetic.py) and stamps of noise and a blob: the training fields'
stamps read as one array without concatenating them (100 fields' stamps are 7 GB), and a run stopped after an
epoch and resumed from its checkpoint ending with the weights of a run that was not stopped."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from _photoz_synthetic import synthetic_reference

BANDS = ["g", "r", "i", "z"]


def _seed(rng, n: int, size: int = 16) -> tuple[pd.DataFrame, np.ndarray]:
    """A seed's measured table (flux_<b>, fluxerr_<b> in the synthetic units, z, mag_true) and its stamps
    (n, 4, size, size): unit noise plus a round blob holding a thousandth of the band's flux."""
    flux, err, z, mag = synthetic_reference(rng, n)
    t = pd.DataFrame({"z": z, "mag_true": mag, **{f"flux_{b}": flux[:, i] for i, b in enumerate(BANDS)},
                      **{f"fluxerr_{b}": err[:, i] for i, b in enumerate(BANDS)}})
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    blob = np.exp(-(xx ** 2 + yy ** 2) / 8.0) / (8 * np.pi)
    stamps = rng.normal(size=(n, 4, size, size)) + 1e-3 * flux[:, :, None, None] * blob
    return t, stamps.astype(np.float32)


def test_stamps_of_the_training_fields_read_as_one_array():
    """_Rows: the fields' usable rows, bands in the model's order, indexed in any order across fields as from
    their concatenation, each field's first row, and pixel_noise's sample the same values."""
    from deepfield.models.train_photoz_cnn import _Rows, pixel_noise
    rng = np.random.default_rng(5)
    fields = [rng.normal(size=(n, 3, 8, 8)).astype(np.float32) for n in (9, 3, 14)]
    keep = [rng.random(len(f)) < 0.8 for f in fields]
    keep[1][:] = [True, False, True]
    order = [2, 0, 1]
    cat = np.concatenate([f[k][:, order] for f, k in zip(fields, keep)])
    rows = _Rows(fields, keep, order)
    assert len(rows) == len(cat) and rows.shape == cat.shape
    pick = rng.permutation(len(cat))[:9]
    assert np.array_equal(rows[pick], cat[pick])
    starts = np.cumsum([0] + [int(k.sum()) for k in keep])
    got = list(rows.chunks())
    assert [s for s, _ in got] == starts[:-1].tolist() and np.array_equal(np.concatenate([p for _, p in got]), cat)
    assert np.array_equal(pixel_noise(rows, frame=2, n=15, seed=3), pixel_noise(cat, frame=2, n=15, seed=3))


def test_a_stopped_training_resumes_to_the_weights_of_one_not_stopped(tmp_path):
    """Two epochs straight and one epoch, stopped, then resumed by the same call: the same weights, history
    and record; the record's counts are the seeds' usable rows (a row with a non-finite flux is left out)."""
    from deepfield.models.train_photoz_cnn import train
    torch.set_num_threads(1)
    rng = np.random.default_rng(11)
    seeds = [_seed(rng, 300) for _ in range(3)]
    seeds[0][0].loc[4, "flux_r"] = np.nan
    tables, stamps = [t for t, _ in seeds], [s for _, s in seeds]
    kw = dict(epochs=2, width=4, nbins=20, batch=50, field_size=512, flux_kind="gaap")
    rec, state = train("straight", tables, stamps, [1, 2, 3], checkpoint=tmp_path / "a.ckpt", **kw)
    assert train("stopped", tables, stamps, [1, 2, 3], checkpoint=tmp_path / "b.ckpt", stop_after=1, **kw) is None
    rec2, state2 = train("resumed", tables, stamps, [1, 2, 3], checkpoint=tmp_path / "b.ckpt", **kw)
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    assert rec["history"] == rec2["history"] and [h["epoch"] for h in rec["history"]] == [1, 2]
    assert rec["metrics"]["held_out"]["i_lt_24"] == rec2["metrics"]["held_out"]["i_lt_24"]  # all at i < 23.5
    assert rec["data"]["field_size"] == 512 and rec["data"]["train_galaxies"] == 599
    assert rec["data"]["held_out_galaxies"] == 300 and rec["data"]["held_out_seed"] == 3
