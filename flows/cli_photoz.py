"""`deepfield train photoz` and `deepfield eval photoz`: the photo-z reference set and its evaluation on held-out
simulated fields (registered on flows/cli_models.py's command groups; flows/cli.py imports this module). The
README's command reference mirrors every option."""
from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import console, fail
from .cli_models import _bands, _checkpoint, _evaluate, _train, _variant_out, eval_app, train_app

MODEL = "photoz_knn"
CNN = "photoz_cnn"


def _photometry(done, flux: str, stages: list[tuple[str, dict]]):
    """A trainer's (record, state, ...) with the record's `photometry`: what the fluxes it was made on depend
    on in the measure stage of `stages` (tasks/stages/photoz.py: photometry_settings), which a run checks against
    its own measure stage before it starts; None (stopped early) as it is."""
    from deepfield.tasks.stages.photoz import photometry_settings
    if done is not None:
        done[0]["photometry"] = photometry_settings(flux, dict(stages).get("measure", {}))
    return done


def _seeds(text: str) -> list[int]:
    """--seeds: comma-separated integers or ranges FIRST-LAST, in the order given (1001-1009,1014-1053,1010)."""
    out = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            a, dash, b = part.partition("-")
            out += list(range(int(a), int(b) + 1)) if dash else [int(a)]
    except ValueError:
        fail(f"--seeds {text!r}: give seeds as 1001,1002,1003, a range 1001-1008 or both, 1001-1008,1010")
    if len(out) < 2 or len(set(out)) != len(out) or min(out) < 0:
        fail(f"--seeds {text!r}: give at least two distinct non-negative seeds (the last one's field is held out)")
    return out


@train_app.command("photoz")
def train_photoz(
    out: Path = typer.Option(None, "--out", "-o", help="weights file (default: the shipped "
                             "models/weights/photoz_knn.pt, or for other --bands the band-set variant "
                             "models/weights/photoz_knn.<bands>.pt)"),
    seeds: str = typer.Option("1001-1010", help="simulated fields, one per seed (comma-separated seeds or "
                              "FIRST-LAST ranges, 1001-1009,1014-1053,1010); "
                              "the last one is held out to fit k and the intervals' spread"),
    size: int = typer.Option(2048, min=256, help="side of each field, pixels"),
    flux: str = typer.Option("gaap", help="photometry of the colours: gaap, aper, auto or deblend (the stage's "
                             "`flux`)"),
    bands: str = typer.Option(None, help="bands of the simulated fields, comma-separated (default g,r,i,z); "
                              "a reference set of other bands is a band-set variant, run for surveys that have "
                              "all of them (u,g,r,i,z,y and u,g,r,i ship)"),
    work: Path = typer.Option(Path(".cache") / "photoz", help="where the fields and each seed's measured galaxies "
                              "are kept; a rerun reads them back (resume)"),
    workers: int = typer.Option(2, min=1, help="processes simulating the fields"),
    device: str = typer.Option("cpu", help="torch device of the measuring stages' networks"),
    library: bool = typer.Option(True, "--library/--measured", help="library: the seeds' true galaxies as noiseless "
                                 "references, weighed by each galaxy's likelihood (the shipped g, r, i, z set); "
                                 "measured: the seeds' measured galaxies, k nearest neighbours"),
) -> None:
    """Build the photo-z reference set (models/photoz.py): simulated fields measured by the pipeline's own
    stages and matched to their truth; with --library (the default) the truth's galaxies are the references and
    the measured ones fit the photometry's scale and the intervals' spread, with --measured the measured
    galaxies are the references, k and the spread chosen by leaving each seed out in turn."""
    from deepfield.flows.evaluate.detection import detection_stages
    from deepfield.models.progress import say
    from deepfield.models.train_photoz import train, train_library
    from deepfield.tasks.trainsets.photoz import seed_tables, seed_truth
    if flux not in ("gaap", "aper", "auto", "deblend"):
        fail(f"--flux {flux!r}: one of gaap, aper, auto, deblend")
    seed_list, band_list = _seeds(seeds), _bands(bands)
    if band_list is not None and len(band_list) < 2:
        fail(f"--bands {bands!r}: colours need at least two bands")
    out = _variant_out(out, MODEL, band_list, ["g", "r", "i", "z"])

    def fit(command: str):
        stages, halo = detection_stages()  # the default run's background, detect, measure, deblend
        tables = seed_tables(seed_list, size, work, stages, halo, workers, flux, band_list, device, say)
        if library:
            truths = [seed_truth(work, s, band_list) for s in seed_list]
            return _photometry(train_library(command, tables, truths, seed_list, size, flux, band_list), flux, stages)
        return _photometry(train(command, tables, seed_list, size, flux, band_list), flux, stages)
    rec = _train("photoz", MODEL, fit, out)
    f = rec["metrics"]["held_out"]["i_lt_24"]
    console.print(f"held out, i < 24: sigma_NMAD {f['sigma_nmad']:.4f}, outliers {f['outliers']:.3f}, "
                  f"bias {f['bias']:+.4f}, 68 % coverage {f.get('coverage_68', float('nan')):.3f}")


@train_app.command("photoz-cnn")
def train_photoz_cnn(
    out: Path = typer.Option(None, "--out", "-o", help="weights file (default: the shipped "
                             "models/weights/photoz_cnn.pt)"),
    seeds: str = typer.Option("1001-1009,1014-1103,1010", help="simulated fields, one per seed (comma-separated "
                              "seeds or FIRST-LAST ranges); the last one is held out (spread of the intervals, "
                              "figures); the default, the shipped weights' 100 fields"),
    size: int = typer.Option(2048, min=256, help="side of each field, pixels"),
    work: Path = typer.Option(Path(".cache") / "photoz", help="where the fields, each seed's measured galaxies and "
                              "their stamps are kept (shared with `train photoz`); a rerun reads them back"),
    epochs: int = typer.Option(20, min=1, help="passes over the training galaxies (the shipped weights': 20 on "
                               "100 fields, as many steps as 40 on 50)"),
    width: int = typer.Option(8, min=2, help="channels of the first convolution (models/photoz_cnn.py)"),
    bins: int = typer.Option(100, min=10, help="redshift bins of the softmax over [0, 4]"),
    batch: int = typer.Option(128, min=8, help="galaxies per training step"),
    lr: float = typer.Option(2e-3, min=0, help="Adam's learning rate (cosine schedule to 0)"),
    band_dropout: float = typer.Option(0.2, min=0, max=1, help="fraction of examples that keep only a random two "
                                       "or more bands"),
    seed: int = typer.Option(0, help="seed of the initialisation, order, augmentation and band dropout"),
    threads: int = typer.Option(2, min=1, help="torch threads"),
    checkpoint: Path = typer.Option(None, help="checkpoint file, written after every epoch and resumed from "
                                    "(default: <out>.ckpt)"),
    stop_after: int = typer.Option(None, min=1, help="stop after this many epochs (resume later from the checkpoint)"),
    workers: int = typer.Option(2, min=1, help="processes simulating the fields"),
    device: str = typer.Option("cpu", help="torch device of the measuring stages' networks"),
    flux: str = typer.Option("gaap", help="photometry given to the network beside the stamps, and of the colour "
                             "baseline fitted for the comparison: gaap, aper or auto (the stage then uses the same)"),
) -> None:
    """Train the photo-z CNN (models/photoz_cnn.py) on stamps and the --flux photometry of simulated galaxies
    measured by the pipeline's own stages, matched to their truth; the colour baseline is fitted on the same
    fields for the comparison in the record."""
    import numpy as np
    import torch

    from deepfield.flows.evaluate.detection import detection_stages
    from deepfield.models import train_photoz, train_photoz_cnn
    from deepfield.models.progress import say
    from deepfield.tasks.trainsets.photoz import seed_tables, stamps_path
    if flux not in ("gaap", "aper", "auto"):
        fail(f"--flux {flux!r}: one of gaap, aper, auto")
    seed_list = _seeds(seeds)
    torch.set_num_threads(threads)
    ck = _checkpoint(checkpoint, out, CNN)

    def fit(command: str):
        stages, halo = detection_stages()
        tables = seed_tables(seed_list, size, work, stages, halo, workers, flux, None, device, say, stamps=True)
        stamps = [np.load(stamps_path(work, s, flux), mmap_mode="r") for s in seed_list]
        base, _ = train_photoz.train(command, tables, seed_list, size, flux)
        return _photometry(train_photoz_cnn.train(
            command, tables, stamps, seed_list, epochs=epochs, width=width, nbins=bins, batch=batch, lr=lr,
            band_dropout=band_dropout, seed=seed, checkpoint=ck, stop_after=stop_after,
            baseline=base["metrics"]["held_out"], flux_kind=flux, field_size=size), flux, stages)
    rec = _train("photoz-cnn", CNN, fit, out)
    f, b = rec["metrics"]["held_out"]["i_lt_24"], rec["metrics"]["colour_baseline_held_out"]["i_lt_24"]
    console.print(f"held out, i < 24: sigma_NMAD {f['sigma_nmad']:.4f} (colour baseline {b['sigma_nmad']:.4f}), "
                  f"outliers {f['outliers']:.3f} ({b['outliers']:.3f}), bias {f['bias']:+.4f}, "
                  f"68 % coverage {f['coverage_68']:.3f}")


@eval_app.command("photoz")
def eval_photoz(
    weights: Path = typer.Option(None, help="reference set (default: the shipped models/weights/photoz_knn.pt)"),
    fields: int = typer.Option(2, min=1, help="held-out simulated fields (one per seed, from --seed on)"),
    size: int = typer.Option(2048, min=256, help="side of each field, pixels"),
    seed: int = typer.Option(20261201, min=0, help="seed of the first held-out field"),
    workers: int = typer.Option(2, min=1, help="processes simulating the fields"),
    work: Path = typer.Option(None, help="keep the simulated fields here and reuse them next time"),
    device: str = typer.Option("cpu", help="torch device of the measuring stages' networks"),
    out: Path = typer.Option(None, help="write the figures as JSON here"),
    cnn_weights: Path = typer.Option(None, help="photo-z CNN weights (default: the shipped "
                                     "models/weights/photoz_cnn.pt)"),
    bands: str = typer.Option(None, help="bands of the held-out fields, comma-separated (default g,r,i,z); "
                              "without --weights the reference set is the one a run on these bands chooses "
                              "(a band-set variant that has them all, else the main one)"),
    method: str = typer.Option(None, help="the photoz stage's method to score as its output: knn, cnn or hybrid "
                               "(default: the default run's); knn and cnn are scored beside it on the same galaxies"),
    precision: str = typer.Option("auto", help="the photoz stage's `precision` on a CPU (the CNN's convolutions): "
                                  "auto (bfloat16 where the CPU computes it natively), float32 or bfloat16"),
) -> None:
    """sigma_NMAD, outliers, bias and the calibration of p(z) (PIT histogram, 68 % coverage) by i magnitude, for
    the stage's method (hybrid by default), knn and cnn and each band set, with the stage's CPU cost, on held-out
    simulated fields against their truth."""
    from deepfield.flows.evaluate.photoz import evaluate, format_report
    if cnn_weights is not None and not cnn_weights.exists():
        fail(f"--cnn-weights {cnn_weights}: no such file")
    band_list = _bands(bands)
    if band_list is not None and len(band_list) < 2:
        fail(f"--bands {bands!r}: colours need at least two bands")
    from typing import get_args

    from deepfield.tasks.stages.photoz import PhotoZConfig
    for option, value, key in (("--method", method, "method"), ("--precision", precision, "precision")):
        choices = get_args(PhotoZConfig.model_fields[key].annotation)  # the stage's own Literal
        if value is not None and value not in choices:
            fail(f"{option} {value!r}: one of {', '.join(choices)}")
    _evaluate(evaluate, format_report, weights, out, n_fields=fields, size=size, seed=seed, workers=workers,
              work=work, device=device, cnn_weights=cnn_weights, bands=band_list, method=method,
              precision=precision)
