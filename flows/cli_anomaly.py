"""`deepfield train anomaly`, `deepfield eval anomaly` and `deepfield eval anomaly-list`: the GAN anomaly scorer
(models/anomaly_gan.py), its training on simulated normal fields, its evaluation on held-out fields with injected
anomalies, and a run's anomaly list scored against a simulation's truth (registered on
flows/cli_models.py's command groups; flows/cli.py imports this module). The README's command reference mirrors
every option."""
from __future__ import annotations

from pathlib import Path

import typer

from deepfield.models.progress import say

from .cli_common import console, fail
from .cli_models import _bands, _checkpoint, _evaluate, _train, _variant_out, eval_app, train_app


@train_app.command("anomaly")
def train_anomaly(
    out: Path = typer.Option(None, "--out", "-o", help="weights file (default: the shipped models/weights/anomaly_wgan.pt)"),
    fields: int = typer.Option(8, min=1, help="simulated fields of normal sources to cut training stamps from"),
    field_size: int = typer.Option(2048, min=256, help="side of each simulated field, pixels"),
    iters: int = typer.Option(3000, min=1, help="WGAN-GP generator steps (5 critic steps each)"),
    enc_iters: int = typer.Option(3000, min=1, help="encoder training steps"),
    batch: int = typer.Option(64, min=2, help="stamps per step"),
    seed: int = typer.Option(0, min=0, help="seed of the fields (seed*1000+1), initialisation and batches"),
    workers: int = typer.Option(2, min=1, help="processes simulating the fields"),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda:0"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
    cache: Path = typer.Option(None, help="keep the training stamps in this .npz and reuse them next time"),
    windows: int = typer.Option(400, min=0, help="stamps per tile at random positions (the anomaly stage's grid "
                                "windows: sky, sources anywhere, stars); 0: stamps centred on the stage's "
                                "selected sources instead"),
    bright_fraction: float = typer.Option(0.0, min=0, max=1, help="of the windows, the fraction centred near a "
                                          "bright peak (stars, bright galaxies; 0.5 was tried, see the card)"),
    checkpoint: Path = typer.Option(None, help="GAN checkpoint, resumed from when it matches (default: <out>.ckpt)"),
    stop_after: int = typer.Option(None, min=1, help="stop after this many GAN steps (checkpoint kept)"),
    bands: str = typer.Option(None, help="bands of the windows, comma-separated (default g,r,i); other bands "
                              "write the band-set variant models/weights/anomaly_wgan.<bands>.pt, e.g. g,r,i,z"),
    encoder_from: Path = typer.Option(None, help="keep the generator and critic of these weights and train only a "
                                      "new encoder for them (--enc-iters steps, from --encoder-seed)"),
    encoder_seed: int = typer.Option(1, min=0, help="with --encoder-from: torch seed of the new encoder's start"),
) -> None:
    """Train the WGAN-GP anomaly scorer and its encoder (models/anomaly_gan.py) on simulated normal sources."""
    from deepfield.models.train_anomaly import MODEL, retrain_encoder, train
    from deepfield.tasks.trainsets.anomaly import training_stamps, training_windows
    band_list = _bands(bands)
    if band_list and not windows:
        fail("--bands needs --windows > 0 (the source stamps are cut in the main weights' bands)")
    out = _variant_out(out, MODEL, band_list, ["g", "r", "i"])
    source_weights = None
    if encoder_from is not None:
        import torch
        try:  # read before any simulation: a wrong file is reported at once
            source_weights = torch.load(encoder_from, map_location="cpu", weights_only=False)
            if source_weights.get("model") != MODEL or "state_dict" not in source_weights:
                raise ValueError(f"not {MODEL} weights")
        except Exception as e:
            fail(f"--encoder-from {encoder_from}: {e}")

    def fit(command: str):
        if windows:
            x, data = training_windows(fields, field_size, seed, windows, workers, cache, progress=say,
                                       bright_fraction=bright_fraction, bands=band_list)
        else:
            x, data = training_stamps(fields, field_size, seed, workers, cache, progress=say)
        if encoder_from is not None:
            try:
                return retrain_encoder(x, source_weights, enc_iters=enc_iters, batch=batch, seed=seed,
                                       encoder_seed=encoder_seed, device=device, threads=threads, command=command,
                                       data=data, source=str(encoder_from))
            except ValueError as e:
                fail(str(e))
        ck = _checkpoint(checkpoint, out, MODEL)
        return train(x, iters=iters, enc_iters=enc_iters, batch=batch, seed=seed, device=device, threads=threads,
                     command=command, data=data, checkpoint=ck, stop_after=stop_after)
    rec = _train("anomaly", MODEL, fit, out)
    console.print(f"final Wasserstein estimate {rec['gan_log'][-1]['w']:.3f}; validation score (full mode) "
                  f"{rec['val_score']['full']['mean']:.1f} +- {rec['val_score']['full']['std']:.1f}")


@eval_app.command("anomaly")
def eval_anomaly(
    weights: Path = typer.Option(None, help="weights file (default: the shipped weights)"),
    fields: int = typer.Option(2, min=1, help="held-out simulated fields with injected anomalies"),
    field_size: int = typer.Option(2048, min=256, help="side of each field, pixels"),
    seed: int = typer.Option(20261125, min=0, help="seed of the held-out fields"),
    steps: int = typer.Option(20, min=1, help="Adam steps on the latent vector in the full mode"),
    workers: int = typer.Option(2, min=1, help="processes simulating the fields"),
    device: str = typer.Option("cpu", help="torch device"),
    refine: float = typer.Option(None, min=0, max=1, help="the stage's `refine` for the coarse-to-fine figures "
                                 "(default: the stage's default)"),
    refine_above: float = typer.Option(None, help="the stage's `refine_above` (default: the stage's default)"),
    full: bool = typer.Option(True, "--full/--fast-only", help="also score the full mode (20x the fast mode's time)"),
    precision: str = typer.Option("auto", help="the stage's `precision` on a CPU: auto (bfloat16 where the CPU "
                                  "computes it natively), float32 or bfloat16"),
    pixel_scale: float = typer.Option(None, "--pixel-scale", min=0.01, help="arcsec per pixel of the fields (the "
                                      "same sky, seeing and depth on another survey's grid; default: the "
                                      "simulator's 0.2)"),
    out: Path = typer.Option(None, help="write the figures as JSON here"),
) -> None:
    """AUROC by anomaly type, injected anomalies in the top 1% and 0.1%, and throughput, of the anomaly stage's
    grid windows in the full and fast modes, for the local score and the paper's, over the dense grid and as
    the stage scores it (coarse to fine)."""
    from deepfield.flows.evaluate.anomaly import evaluate, format_report
    _evaluate(evaluate, format_report, weights, out, n_fields=fields, size=field_size, seed=seed, steps=steps,
              workers=workers, device=device, refine=refine, refine_above=refine_above, full=full,
              precision=precision, pixel_scale=pixel_scale)


@eval_app.command("anomaly-list")
def eval_anomaly_list(
    run_dir: Path = typer.Argument(..., help="a run directory (its catalogs/anomalies.parquet is scored)"),
    truth: Path = typer.Option(..., help="the simulation's truth directory (anomalies.parquet, lenses.parquet), "
                               "e.g. the `truth/` of `deepfield simulate --out`"),
    top: int = typer.Option(100, min=1, help="the list's first candidates the `top` figures count"),
    match_px: float = typer.Option(12.0, min=0, help="a candidate this many pixels from an injected anomaly "
                                   "lists it"),
    out: Path = typer.Option(None, help="write the figures as JSON here"),
) -> None:
    """Score a run's anomaly list against the simulation's injected anomalies: per type the fraction listed, the
    fraction in the first `top` candidates and the median rank, and the fraction of the first `top` candidates
    that lie on an injected anomaly (flows/evaluate/anomaly_list.py)."""
    from deepfield.flows.evaluate.anomaly_list import format_list_report, score_list
    _evaluate(lambda weights, **kw: score_list(**kw), format_list_report, None, out, run_dir=run_dir,
              truth_dir=truth, top=top, match_px=match_px)
