"""`deepfield train lens|merger` and `deepfield eval lens|merger`: the strong-lens finder and the merger finder, one
network (models/lens_cnn.py) trained on two stamp sets (tasks/trainsets/lens_stamps.py; the merger finder's also
and both on their stage's candidates in simulated fields, tasks/trainsets/candidate_fields.py). Registered on
flows/cli_models.py's command groups (flows/cli.py imports this module); the README's command reference mirrors
every option."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from deepfield.models.progress import say

from .cli_common import console
from .cli_models import _bands, _evaluate, _train, _variant_out, eval_app, train_app

FIELD_TRAIN_OFFSET, FIELD_VAL_OFFSET = 11, 12  # `train lens|merger --seed S`: its fields' seeds S*1000 + these


def with_fields(target: str, tr: dict, va: dict, fields: int, val_fields: int, seed: int, bands: list[str],
                cache: Path, workers: int) -> tuple[dict, dict, dict]:
    """The composed training and validation stamps `tr` and `va` joined by the `target` stage's candidates in
    `fields` and `val_fields` simulated fields (tasks/trainsets/candidate_fields.py, seeds seed*1000 + 11 and
    + 12); returns them and the field sets' description for the training record."""
    import pandas as pd

    from deepfield.tasks.trainsets.candidate_fields import field_stamps
    counts = {}
    sets = {"train": tr, "val": va}
    for name, n, offset in (("train", fields, FIELD_TRAIN_OFFSET), ("val", val_fields, FIELD_VAL_OFFSET)):
        if n:
            f = field_stamps(n, seed * 1000 + offset, bands, cache, workers=workers, target=target, say=say)
            counts[name] = dict(fields=n, seed=seed * 1000 + offset, candidates=int(len(f["label"])),
                                **{"on_lenses" if target == "lens" else "on_mergers": int(f["label"].sum())})
            a = sets[name]
            sets[name] = dict(images=np.concatenate([a["images"], f["images"]]),
                              sigma=np.concatenate([a["sigma"], f["sigma"]]),
                              label=np.concatenate([a["label"], f["label"]]),
                              meta=pd.concat([a["meta"], f["meta"]], ignore_index=True))
    return sets["train"], sets["val"], counts


@train_app.command("lens")
def train_lens(
    out: Path = typer.Option(None, "--out", "-o", help="weights file (default: the shipped models/weights/lens_resnet.pt)"),
    n_train: int = typer.Option(16000, "--n-train", min=64, help="training stamps (half lenses)"),
    n_val: int = typer.Option(2000, "--n-val", min=64, help="validation stamps (half lenses)"),
    epochs: int = typer.Option(10, min=1, help="passes over the training stamps"),
    batch: int = typer.Option(128, min=1, help="stamps per optimisation step"),
    lr: float = typer.Option(2e-3, help="peak learning rate (one-cycle schedule)"),
    seed: int = typer.Option(0, min=0, help="seed of the stamps, initialisation and batch order"),
    workers: int = typer.Option(2, min=1, help="processes simulating stamps"),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda:0"),
    bands: str = typer.Option(None, help="bands of the stamps, comma-separated (default g,r,i,z); other bands "
                              "write the band-set variant models/weights/lens_resnet.<bands>.pt"),
    fields: int = typer.Option(6, min=0, help="simulated 2048^2 fields whose lens-stage candidates join the "
                               "training stamps (0: composed stamps only)"),
    val_fields: int = typer.Option(1, min=0, help="simulated fields whose candidates join the validation stamps"),
    cache: Path = typer.Option(Path(".cache") / "lens_fields", help="directory keeping the field stamps for "
                               "later runs"),
) -> None:
    """Train the strong-lens CNN (models/lens_cnn.py) on simulated lenses and hard negatives
    (tasks/trainsets/lens_stamps.py), and on the lens stage's candidates cut from simulated fields
    (tasks/trainsets/candidate_fields.py)."""
    import time

    from deepfield.models.train_lens import MODEL, train
    from deepfield.tasks.trainsets.lens_stamps import StampConfig, training_sets
    band_list = _bands(bands)
    out = _variant_out(out, MODEL, band_list, StampConfig().bands)

    def fit(command: str):
        cfg = StampConfig(**({"bands": band_list} if band_list else {}))
        tr, va, seconds = training_sets(n_train, n_val, seed, cfg, workers, say)
        t0 = time.perf_counter()
        tr, va, counts = with_fields("lens", tr, va, fields, val_fields, seed, cfg.bands, cache, workers)
        return train(tr, va, epochs=epochs, batch=batch, lr=lr, seed=seed, device=device,
                     record=dict(stamp_config=cfg.model_dump(mode="json"), n_train=n_train, n_val=n_val,
                                 field_stamps=counts, command=command, data_seconds=round(seconds, 1),
                                 field_seconds=round(time.perf_counter() - t0, 1)))
    rec = _train("lens", MODEL, fit, out)
    last = rec["history"][-1]
    console.print(f"final val loss {last['val_loss']:.4f}, val AUROC {last['val_auroc']:.4f}")


@train_app.command("merger")
def train_merger(
    out: Path = typer.Option(None, "--out", "-o", help="weights file (default: the shipped "
                             "models/weights/merger_resnet.pt)"),
    n_train: int = typer.Option(10000, "--n-train", min=64, help="training stamps (half mergers)"),
    n_val: int = typer.Option(1200, "--n-val", min=64, help="validation stamps (half mergers)"),
    epochs: int = typer.Option(10, min=1, help="passes over the training stamps"),
    batch: int = typer.Option(128, min=1, help="stamps per optimisation step"),
    lr: float = typer.Option(2e-3, help="peak learning rate (one-cycle schedule)"),
    seed: int = typer.Option(0, min=0, help="seed of the stamps, initialisation and batch order"),
    workers: int = typer.Option(2, min=1, help="processes simulating stamps"),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda:0"),
    bands: str = typer.Option(None, help="bands of the stamps, comma-separated (default g,r,i,z); other bands "
                              "write the band-set variant models/weights/merger_resnet.<bands>.pt"),
    fields: int = typer.Option(6, min=0, help="simulated 2048^2 fields whose merger-stage candidates join the "
                               "training stamps (0: composed stamps only)"),
    val_fields: int = typer.Option(1, min=0, help="simulated fields whose candidates join the validation stamps"),
    cache: Path = typer.Option(Path(".cache") / "merger_fields", help="directory keeping the field stamps for "
                               "later runs"),
) -> None:
    """Train the merger classifier (the lens CNN's network, models/lens_cnn.py) on simulated mergers with tidal
    tails against close pairs without tails and other look-alikes (tasks/trainsets/lens_stamps.py), and on the
    merger stage's candidates cut from simulated fields (tasks/trainsets/candidate_fields.py)."""
    import time

    from deepfield.models.train_lens import MERGER_MODEL, train
    from deepfield.tasks.trainsets.lens_stamps import merger_config, training_sets
    band_list = _bands(bands)
    out = _variant_out(out, MERGER_MODEL, band_list, merger_config().bands)

    def fit(command: str):
        cfg = merger_config(**({"bands": band_list} if band_list else {}))
        tr, va, seconds = training_sets(n_train, n_val, seed, cfg, workers, say)
        t0 = time.perf_counter()
        tr, va, counts = with_fields("merger", tr, va, fields, val_fields, seed, cfg.bands, cache, workers)
        return train(tr, va, epochs=epochs, batch=batch, lr=lr, seed=seed, device=device, model_name=MERGER_MODEL,
                     record=dict(stamp_config=cfg.model_dump(mode="json"), n_train=n_train, n_val=n_val,
                                 field_stamps=counts, command=command, data_seconds=round(seconds, 1),
                                 field_seconds=round(time.perf_counter() - t0, 1)))
    rec = _train("merger", MERGER_MODEL, fit, out)
    last = rec["history"][-1]
    console.print(f"final val loss {last['val_loss']:.4f}, val AUROC {last['val_auroc']:.4f}")


@eval_app.command("lens")
def eval_lens(
    weights: Path = typer.Option(None, help="weights file (default: the shipped weights)"),
    n: int = typer.Option(10000, min=100, help="stamps per evaluation set"),
    lens_fraction: float = typer.Option(0.02, min=0.001, max=0.5, help="fraction of lenses in each set"),
    seed: int = typer.Option(20261123, min=0, help="seed of the held-out sets (training uses seed*1000+1, +2)"),
    shifted: bool = typer.Option(True, "--shifted/--no-shifted", help="also evaluate the shifted configuration "
                                 "(PSF 30% wider, 0.7 mag shallower)"),
    workers: int = typer.Option(2, min=1, help="processes simulating stamps"),
    device: str = typer.Option("cpu", help="torch device"),
    batch: int = typer.Option(256, min=1, help="stamps per inference batch"),
    precision: str = typer.Option("auto", help="the lens stage's `precision` on a CPU: auto (bfloat16 where the "
                                  "CPU computes it natively), float32 or bfloat16"),
    pixel_scale: float = typer.Option(None, "--pixel-scale", min=0.01, help="arcsec per pixel of the stamps: "
                                      "simulated on that grid and cut as the stage cuts a field of that scale "
                                      "(resampled onto the training grid); default: the training stamps' grid; "
                                      "not the fields'"),
    fields: int = typer.Option(2, min=0, help="held-out simulated 2048^2 fields whose lens-stage candidates are "
                               "scored too (0: none)"),
    field_seed: int = typer.Option(20261210, min=0, help="seed of those fields"),
    cache: Path = typer.Option(Path(".cache") / "lens_fields", help="directory keeping the fields' stamps"),
    out: Path = typer.Option(None, help="write the figures as JSON here"),
) -> None:
    """AUROC, TPR0, TPR10 (Metcalf et al. 2019), completeness and throughput of the lens CNN on composed stamps,
    and its figures on the lens stage's own candidates in simulated fields."""
    _evaluate_finder("lens", weights, n, lens_fraction, seed, shifted, workers, device, batch, precision,
                     pixel_scale, fields, field_seed, cache, out)


@eval_app.command("merger")
def eval_merger(
    weights: Path = typer.Option(None, help="weights file (default: the shipped weights)"),
    n: int = typer.Option(4000, min=100, help="stamps per evaluation set"),
    merger_fraction: float = typer.Option(0.1, min=0.001, max=0.5, help="fraction of mergers in each set"),
    seed: int = typer.Option(20261206, min=0, help="seed of the held-out sets (training uses seed*1000+1, +2)"),
    shifted: bool = typer.Option(True, "--shifted/--no-shifted", help="also evaluate the shifted configuration "
                                 "(PSF 30% wider, 0.7 mag shallower)"),
    workers: int = typer.Option(2, min=1, help="processes simulating stamps"),
    device: str = typer.Option("cpu", help="torch device"),
    batch: int = typer.Option(256, min=1, help="stamps per inference batch"),
    precision: str = typer.Option("auto", help="the merger stage's `precision` on a CPU: auto (bfloat16 where the "
                                  "CPU computes it natively), float32 or bfloat16"),
    fields: int = typer.Option(2, min=0, help="held-out simulated 2048^2 fields whose merger-stage candidates are "
                               "scored too (0: none)"),
    field_seed: int = typer.Option(20261208, min=0, help="seed of those fields"),
    cache: Path = typer.Option(Path(".cache") / "merger_fields", help="directory keeping the fields' stamps"),
    pixel_scale: float = typer.Option(None, "--pixel-scale", min=0.01, help="arcsec per pixel of the composed "
                                      "stamps: simulated on that grid and cut as the stage cuts a field of that "
                                      "scale (resampled onto the training grid); not the fields'"),
    out: Path = typer.Option(None, help="write the figures as JSON here"),
) -> None:
    """AUROC, TPR0, TPR10, completeness against magnitude and separation, false positives by kind (close pairs
    without tails among them) and throughput of the merger CNN on composed stamps, and its figures on the merger
    stage's own candidates in simulated fields."""
    _evaluate_finder("merger", weights, n, merger_fraction, seed, shifted, workers, device, batch, precision,
                     pixel_scale, fields, field_seed, cache, out)


def _evaluate_finder(target: str, weights, n, fraction, seed, shifted, workers, device, batch, precision, pixel_scale,
                     fields, field_seed, cache, out) -> None:
    """`eval lens` and `eval merger`: the `target` finder on composed stamps of the training configuration, then
    the shifted one, then its stage's candidates in `fields` simulated fields; printed and written to `out`."""
    from deepfield.flows.evaluate.lens import evaluate, evaluate_fields, format_fields, format_report

    def sets(weights):
        res = [evaluate(weights, n, fraction, seed, s, workers, device, batch, precision, target=target,
                        pixel_scale=pixel_scale) for s in (False, True)[:1 + shifted]]
        if fields:
            res.append(evaluate_fields(weights, fields, field_seed, cache, workers, device, batch, precision,
                                       target=target))
        return res
    _evaluate(sets, lambda results: "\n".join(format_fields(r) if r["config"] == "fields" else format_report(r)
                                               for r in results), weights, out)
