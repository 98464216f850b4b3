"""Stamps resampled onto the networks' training pixel grid (tasks/stages/_pixels.resampled_stamps), and the lens
and merger stages taking them on a field of another pixel scale."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from deepfield.tasks.stages._pixels import centred_stamps, resampled_stamps


def _gaussian(ny: int, nx: int, x0: float, y0: float, sigma: float, flux: float) -> np.ndarray:
    """A circular Gaussian of `flux` integrated over each pixel (pixel j spans [j - 0.5, j + 0.5))."""
    from scipy.special import erf

    def edges(n, c):
        e = (np.arange(n + 1) - 0.5 - c) / (np.sqrt(2) * sigma)
        return np.diff(0.5 * erf(e))
    return flux * np.outer(edges(ny, y0), edges(nx, x0))


def _moments(img: np.ndarray) -> tuple[float, float, float]:
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    t = img.sum()
    x, y = (img * xx).sum() / t, (img * yy).sum() / t
    return x, y, float(np.sqrt((img * ((xx - x) ** 2 + (yy - y) ** 2)).sum() / t / 2))


@pytest.mark.parametrize("ratio", [0.2 / 0.262, 0.2 / 0.168, 0.5])
def test_a_gaussian_keeps_its_flux_and_angular_size_centred_on_its_position(ratio):
    """A Gaussian of sigma 2 field pixels at (60.3, 57.8): on the new grid its light is all there (flux
    conserved to 1e-5), its centroid at the stamp's centre ((size - 1) / 2) and its sigma 2 / ratio output
    pixels with the pixels' own variance added: 1/12 px^2 for the field's pixels that integrate it, 1/12 for
    reading them as constant over each pixel (both in field pixels, divided by ratio^2) and 1/12 for the output
    pixels that integrate that."""
    img = _gaussian(120, 128, 60.3, 57.8, 2.0, 1000.0)[None]
    inv = np.full_like(img, 4.0)
    st, sg = resampled_stamps(img, inv, np.ones(img.shape, bool), np.array([60.3]), np.array([57.8]), 48, ratio)
    assert st.shape == (1, 1, 48, 48)
    assert st.sum() == pytest.approx(1000.0, rel=1e-5)
    x, y, s = _moments(st[0, 0].astype(np.float64))
    assert x == pytest.approx(23.5, abs=0.01) and y == pytest.approx(23.5, abs=0.01)
    expected = np.sqrt((2.0 ** 2 + 2 / 12) / ratio ** 2 + 1 / 12)
    assert s == pytest.approx(expected, rel=3e-3)  # the pixels as constant: exact to 0.3 %
    assert sg[0, 0] == pytest.approx(0.5 * ratio)


def test_flat_sky_scales_with_the_pixel_area_and_masked_pixels_hold_nothing():
    """A constant surface brightness of 2 per field pixel is 2 ratio^2 per output pixel; the sigma of a pixel of
    that side is the field's (1 / sqrt(invvar) = 0.5) times ratio; the output pixels over the unusable field
    pixels hold 0 (their light is unknown, as in the native stamps) and those partly over them a share."""
    ratio = 0.2 / 0.262
    img = np.full((2, 100, 100), 2.0, np.float32)
    inv = np.full_like(img, 4.0)
    usable = np.ones(img.shape, bool)
    usable[1, :, :50] = False  # band 1: the left half masked
    st, sg = resampled_stamps(img, inv, usable, np.array([49.5]), np.array([49.5]), 40, ratio)
    np.testing.assert_allclose(st[0, 0], 2.0 * ratio ** 2, rtol=1e-5)
    np.testing.assert_allclose(sg[0], 0.5 * ratio, rtol=1e-6)
    np.testing.assert_allclose(st[0, 1, :, :20], 0.0, atol=1e-7)
    np.testing.assert_allclose(st[0, 1, :, 20:], 2.0 * ratio ** 2, rtol=1e-5)


def test_ratio_one_on_a_pixel_centred_source_is_the_native_stamp():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(3, 90, 90)).astype(np.float32)
    inv = rng.uniform(0.5, 2.0, size=img.shape).astype(np.float32)
    usable = rng.uniform(size=img.shape) > 0.05
    x, y = np.array([40.5, 12.5]), np.array([33.5, 80.5])  # stamp centres on pixel corners, as size 48 puts them
    a, sa = centred_stamps(img, inv, usable, x, y, 48)
    b, sb = resampled_stamps(img, inv, usable, x, y, 48, 1.0)
    np.testing.assert_allclose(b, a, atol=1e-5)
    np.testing.assert_allclose(sb, sa, rtol=1e-6)


@pytest.mark.parametrize("stage_name", ["lens", "merger"])
def test_the_stages_cut_stamps_on_their_training_grid(stage_name):
    """On a field of 0.262" pixels a galaxy of sigma 1" (3.82 field pixels) fills the stamp as on the 0.2" grid
    the networks were trained on (5 pixels), centred; on a 0.2" field the stamp is the native cut as before."""
    from deepfield.tasks.stages.registry import make_stage
    stage = make_stage(stage_name)
    stage.setup("cpu")
    assert stage.train_pixel_scale == pytest.approx(0.2)
    nb = len(stage.bands)
    for scale in (0.262, 0.2):
        sig_px = 1.0 / scale
        one = _gaussian(160, 160, 80.0, 80.0, sig_px, 500.0).astype(np.float32)
        tile = SimpleNamespace(bands=list(stage.bands), pixel_scale=scale, image=np.stack([one] * nb),
                               invvar=np.full((nb, 160, 160), 1.0, np.float32),
                               mask=np.zeros((nb, 160, 160), np.int32))
        st, sg = stage.stamps(tile, np.array([80.0]), np.array([80.0]))
        assert st.shape == (1, nb, stage.size, stage.size)
        x, y, s = _moments(st[0, 0].astype(np.float64))
        assert s == pytest.approx(5.0, abs=0.05)
        if scale == 0.2:
            assert stage.grid_ratio(tile) == 1.0
            np.testing.assert_array_equal(st[0, 0], one[56:104, 56:104])  # the native cut, x0 = rint(80 - 23.5)
        else:
            assert stage.grid_ratio(tile) == pytest.approx(0.2 / 0.262)
            assert x == pytest.approx(23.5, abs=0.01) and y == pytest.approx(23.5, abs=0.01)
            np.testing.assert_allclose(sg[0], 0.2 / 0.262, rtol=1e-6)


def test_eval_lens_cuts_its_stamps_as_the_stage_cuts_a_field_of_that_scale():
    """`deepfield eval lens --pixel-scale`: stamps simulated on a 0.262" grid, as large as the training stamps' sky
    needs, then cut by the stage: the training stamps' size, each band's sigma that of a 0.2" pixel (the simulated
    sigma times 0.2 / 0.262), the light of the 9.6" the training stamps cover; on the training grid itself the
    stage's native cut, the simulated stamp's middle."""
    from deepfield.flows.evaluate.lens import stage_stamps
    from deepfield.tasks.stages.lens import LensStage
    from deepfield.tasks.trainsets.lens_stamps import StampConfig, simulate_stamps
    stage = LensStage()
    stage.setup("cpu")
    d = simulate_stamps(6, 0.5, 11, StampConfig(pixel_scale=0.262, size=42, neighbour_rate=0.0), workers=1)
    st, sg = stage_stamps(stage, d["images"], d["sigma"], 0.262)
    assert st.shape == (6, 4, 48, 48)
    np.testing.assert_allclose(sg, d["sigma"] * 0.2 / 0.262, rtol=1e-5)
    inner = d["images"][:, :, 2:-3, 2:-3].sum(axis=(2, 3))  # 37 px: the 9.6" (36.6 px) and a little
    np.testing.assert_allclose(st.sum(axis=(2, 3)), inner, rtol=0.05, atol=3 * float(d["sigma"].max()) * 37)
    d2 = simulate_stamps(3, 0.5, 12, StampConfig(size=52, neighbour_rate=0.0), workers=1)
    st2, _ = stage_stamps(stage, d2["images"], d2["sigma"], 0.2)
    np.testing.assert_array_equal(st2, d2["images"][:, :, 2:50, 2:50])
