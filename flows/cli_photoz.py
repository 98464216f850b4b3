"""`deepfield train photoz` and `deepfield eval photoz`: the photo-z reference set and its evaluation on held-out
simulated fields (registered on flows/cli_models.py's command groups; flows/cli.py imports this module). The
README's command reference mirrors every option."""
from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import console, fail
from .cli_models import _bands, _evaluate, _train, eval_app, train_app

MODEL = "photoz_knn"


def _seeds(text: str) -> list[int]:
    """--seeds: comma-separated integers, or a range FIRST-LAST."""
    try:
        if "-" in text.strip("-"):
            a, b = text.split("-", 1)
            out = list(range(int(a), int(b) + 1))
        else:
            out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds {text!r}: give seeds as 1001,1002,1003 or a range 1001-1008")
    if len(out) < 2 or len(set(out)) != len(out) or min(out) < 0:
        fail(f"--seeds {text!r}: give at least two distinct non-negative seeds (the last one's field is held out)")
    return out


@train_app.command("photoz")
def train_photoz(
    out: Path = typer.Option(None, "--out", "-o", help="weights file (default: the shipped "
                             "models/weights/photoz_knn.pt)"),
    seeds: str = typer.Option("1001-1010", help="simulated fields, one per seed (comma-separated or FIRST-LAST); "
                              "the last one is held out to fit k and the intervals' spread"),
    size: int = typer.Option(2048, min=256, help="side of each field, pixels"),
    flux: str = typer.Option("aper", help="photometry of the colours: aper, auto or deblend (the stage's `flux`)"),
    bands: str = typer.Option(None, help="bands of the simulated fields, comma-separated (default g,r,i,z)"),
    work: Path = typer.Option(Path(".cache") / "photoz", help="where the fields and each seed's measured galaxies "
                              "are kept; a rerun reads them back (resume)"),
    workers: int = typer.Option(2, min=1, help="processes simulating the fields"),
    device: str = typer.Option("cpu", help="torch device of the measuring stages' networks"),
) -> None:
    """Build the photo-z reference set (models/photoz.py): simulated fields measured by the pipeline's own
    stages, matched to their truth; k and the intervals' spread fitted on the last seed's field."""
    from deepfield.flows.evaluate.detection import detection_stages
    from deepfield.models.progress import say
    from deepfield.models.train_photoz import train
    from deepfield.tasks.trainsets.photoz import seed_tables
    if flux not in ("aper", "auto", "deblend"):
        fail(f"--flux {flux!r}: one of aper, auto, deblend")
    seed_list, band_list = _seeds(seeds), _bands(bands)

    def fit(command: str):
        stages, halo = detection_stages()  # the default run's background, detect, measure, deblend
        tables = seed_tables(seed_list, size, work, stages, halo, workers, flux, band_list, device, say)
        return train(command, tables, seed_list, size, flux, band_list)
    rec = _train("photoz", MODEL, fit, out)
    f = rec["metrics"]["held_out"]["i_lt_24"]
    console.print(f"held out, i < 24: sigma_NMAD {f['sigma_nmad']:.4f}, outliers {f['outliers']:.3f}, "
                  f"bias {f['bias']:+.4f}, 68 % coverage {f.get('coverage_68', float('nan')):.3f}")


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
) -> None:
    """sigma_NMAD, outliers, bias and the calibration of p(z) (PIT histogram, 68 % coverage) by i magnitude, for
    each method and band set, with the stage's CPU cost, on held-out simulated fields against their truth."""
    from deepfield.flows.evaluate.photoz import evaluate, format_report
    _evaluate(evaluate, format_report, weights, out, n_fields=fields, size=size, seed=seed, workers=workers,
              work=work, device=device)
