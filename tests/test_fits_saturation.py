"""tasks.fits_input: the saturation level of a band without a mask file (the header's SATURATE or SATLEVEL, or
the configuration's `saturation`), on tiny hand-made files. The other FITS-input tests are in test_fits_input.py."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from deepfield.tasks import maskbits
from deepfield.tasks.fits_input import load_field

from _fits_inputs import NX, NY, make_wcs, raises, spec, write_band


def test_saturation_level_masks_sat_without_a_mask(tmp_path):
    """A band without a mask file gets the pixels at or above its header's SATURATE masked SAT (a star's clipped
    flat top and its bleed trail, which were measured as light); a mask file, which marks saturation itself,
    turns the header's level off; a configured `saturation` applies in any case; a header level that most pixels
    reach is no saturation level and is left unused with a note."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[:NY, :NX]
    star = 500.0 * np.exp(-((x - 40.3) ** 2 + (y - 30.6) ** 2) / (2 * 1.5 ** 2))
    img = (star + rng.normal(0, 1.0, (NY, NX))).astype(np.float32)
    level = 123.45678
    img[img >= level] = np.float32(level)  # the clipped core reads the level, as a camera's saturated pixels do
    img[12:30, 40] = np.float32(level)  # a bleed trail down the column
    clipped = img >= np.float32(level)
    d1 = tmp_path / "plain"
    d1.mkdir()
    files = {"i": write_band(d1, "i", img, make_wcs())}
    with fits.open(files["i"]["image"], mode="update") as h:
        h[0].header["SATURATE"] = (round(level, 4), "saturation level")  # rounded, as headers write it
    f = load_field(spec(files))
    sat = (f.mask[0] & maskbits.SAT) != 0
    assert clipped.sum() > 25 and np.array_equal(sat, clipped)
    assert any(f"{int(clipped.sum())} pixels at or above the saturation level" in n for n in f.notes)
    assert f.invvar[0, 0, 0] == pytest.approx(1.0, rel=0.15)  # the clipped core left out of the noise estimate
    # with a mask file (no bit set) the header's level masks nothing
    d2 = tmp_path / "masked"
    d2.mkdir()
    mfiles = {"i": write_band(d2, "i", img, make_wcs(), mask=np.zeros((NY, NX), np.int32))}
    with fits.open(mfiles["i"]["image"], mode="update") as h:
        h[0].header["SATURATE"] = level
    assert not np.any(load_field(spec(mfiles)).mask[0] & maskbits.SAT)
    # a configured level applies with the mask too
    mfiles["i"]["saturation"] = 100.0
    f = load_field(spec(mfiles))
    assert np.array_equal((f.mask[0] & maskbits.SAT) != 0, img >= 100.0)
    mfiles["i"]["saturation"] = -1.0
    raises(spec(mfiles), mfiles["i"]["image"], "saturation level of band i is -1.0")
    # an image rescaled after its header's level was written: its stars exceed the level many times over
    with fits.open(files["i"]["image"], mode="update") as h:
        h[0].data = h[0].data * np.float32(10.0)
    f = load_field(spec(files))
    assert not np.any(f.mask[0] & maskbits.SAT)
    assert any("10.0 times the header's saturation level" in n for n in f.notes)
    # a header level under the sky noise is no saturation level
    with fits.open(files["i"]["image"], mode="update") as h:
        h[0].header["SATURATE"] = 0.5
    f = load_field(spec(files))
    assert not np.any(f.mask[0] & maskbits.SAT)
    assert any("not a saturation level, not used" in n for n in f.notes)
