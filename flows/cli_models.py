"""`deepfield train ...` and `deepfield eval ...`: training and evaluation of the models in `models/` on
simulated data. A `train` command makes its data with a training-set builder (tasks/trainsets/) and hands
the arrays to the model's training loop (models/train_*.py); an `eval` command runs an evaluation flow
(flows/evaluate/). The learned detector's commands (train library, train detect, eval detect) are in
flows/cli_detect.py, the lens and merger finders' in flows/cli_lens.py, the anomaly scorer's in
flows/cli_anomaly.py and the photo-z's in flows/cli_photoz.py, on the same command groups. Registered on the main command line by flows/cli.py; the
README's command reference mirrors every option."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import typer

from deepfield.models.progress import say
from deepfield.tasks.atomic import atomic_path, write_text

from .cli_common import console, fail

LIBRARY_DIR = Path(".cache") / "library"  # the rendered galaxy library (`train library`), relative to the cwd
train_app = typer.Typer(no_args_is_help=True, help="Train a model on simulated data; writes weights and a record.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a model on held-out simulated data.")


def _save_json(obj, path: Path) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float))


def _train(name: str, model: str, fit: Callable[[str], tuple[dict, dict]], out: Path | None) -> dict:
    """Run one model's `fit(command) -> (record, weights[, tensors for the weights file only])`, write the
    weights with the record inside and the record beside them as JSON (both atomically: a killed run leaves the
    old files or the new), and print where both are. The record keeps the exact command line, so the weights
    can be reproduced."""
    import torch

    from deepfield.models.registry import entry
    out = out or entry(model).weights
    command = " ".join([f"deepfield train {name}", *sys.argv[3:]])
    done = fit(command)
    if done is None:  # stopped early on request; the checkpoint holds the run
        raise typer.Exit(0)
    rec, state, *extra = done  # extra: tensors saved in the weights file only (not in the JSON record)
    with atomic_path(out) as tmp:
        torch.save(dict(rec, **(extra[0] if extra else {}), state_dict=state), tmp)
    _save_json(rec, out.with_suffix(".train.json"))
    console.print(f"weights: {out}\nrecord: {out.with_suffix('.train.json')}")
    return rec


def _bands(bands: str | None) -> list[str] | None:
    """The --bands option: comma-separated band names (None: the model's default bands)."""
    if bands is None:
        return None
    out = [b.strip() for b in bands.split(",") if b.strip()]
    if not out or len(set(out)) != len(out):
        fail(f"--bands {bands!r}: give distinct band names separated by commas, e.g. g,r,z")
    from deepfield.tasks.sim.config import DEFAULT_BANDS
    unknown = [b for b in out if b not in DEFAULT_BANDS]
    if unknown:
        fail(f"--bands {bands!r}: the simulator knows no band {', '.join(unknown)} (it has {', '.join(DEFAULT_BANDS)})")
    return out


def _variant_out(out: Path | None, model: str, bands: list[str] | None, default: list[str]) -> Path | None:
    """Where a training command writes: `out`, else for bands other than the model's default the shipped
    band-set variant `<name>.<bands>.pt` (models/registry.py), else the main weights (None)."""
    if out is not None or bands is None or list(bands) == list(default):
        return out
    from deepfield.models.registry import variant_weights
    return variant_weights(model, "".join(bands))


def _checkpoint(checkpoint: Path | None, out: Path | None, model: str) -> Path:
    """A training command's checkpoint file: the one given, else beside the weights it writes (<out>.ckpt)."""
    from deepfield.models.registry import entry
    return checkpoint or (out or entry(model).weights).with_suffix(".ckpt")


def _evaluate(evaluate, format_report, weights: Path | None, out: Path | None, **options) -> None:
    """Run one model's `evaluate(weights=..., **options)`, print its report and write the figures to `out`."""
    if weights is not None and not weights.exists():
        fail(f"{weights}: no such weights file")
    try:
        r = evaluate(weights=weights, **options)
    except FileNotFoundError as exc:
        fail(str(exc))
    print(format_report(r))
    if out:
        _save_json(r, out)
        console.print(f"figures: {out}")


@train_app.command("deblend")
def train_deblend(
    out: Path = typer.Option(None, "--out", "-o", help="weights file (default: the shipped models/weights/deblend_unet.pt)"),
    n_train: int = typer.Option(3000, "--n-train", min=16, help="training blends (every member is an example)"),
    n_val: int = typer.Option(300, "--n-val", min=16, help="validation blends"),
    epochs: int = typer.Option(12, min=1, help="passes over the training examples"),
    batch: int = typer.Option(64, min=1, help="examples per optimisation step"),
    lr: float = typer.Option(3e-3, help="peak learning rate (one-cycle schedule)"),
    seed: int = typer.Option(0, min=0, help="seed of the blends, initialisation and batch order"),
    workers: int = typer.Option(2, min=1, help="processes simulating blends"),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda:0"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads (1: no OpenMP spinning when other processes "
                                "share the cores)"),
    widths: str = typer.Option("8,16,32,64", help="U-Net channel widths, one per level, comma-separated"),
    composed: bool = typer.Option(False, "--composed/--galsim", help="blends composed from the galaxy library, "
                                  "fresh at every step (--steps, --blends-per-step), or a fixed set rendered "
                                  "with GalSim (--n-train, --epochs)"),
    steps: int = typer.Option(3500, min=1, help="--composed: training steps"),
    blends_per_step: int = typer.Option(24, min=1, help="--composed: blends per step (every member an example)"),
    library: Path = typer.Option(LIBRARY_DIR, help="--composed: the rendered galaxy library (built when missing)"),
    checkpoint: Path = typer.Option(None, help="--composed: checkpoint file, resumed from when it matches "
                                    "(default: <out>.ckpt)"),
    stop_after: int = typer.Option(None, min=1, help="--composed: stop after this many steps (checkpoint kept)"),
    bands: str = typer.Option(None, help="bands of the blends, comma-separated (default g,r,i,z; not with "
                              "--composed); other bands write the band-set variant models/weights/deblend_unet.<bands>.pt"),
    output: str = typer.Option("fraction", help="the network's output: 'fraction' (each pixel's share of the "
                               "member) or 'image' (the member's noiseless image, a template whose amplitude the "
                               "stage fits; --composed only)"),
) -> None:
    """Train the learned deblender (models/deblend_unet.py) on blends of galaxies."""
    from deepfield.models.train_deblend import MODEL, train, train_stream
    from deepfield.tasks.trainsets.blend_stamps import BlendConfig, training_examples
    band_list = _bands(bands)
    if band_list and composed:
        fail("--bands: the composed blends come from the g, r, i, z galaxy library; use the GalSim blends (--galsim)")
    if output not in ("fraction", "image"):
        fail(f"--output {output!r}: 'fraction' or 'image'")
    if output == "image" and not composed:
        fail("--output image trains on composed blends only: add --composed")
    out = _variant_out(out, MODEL, band_list, BlendConfig().bands)

    def fit_composed(command: str):
        from deepfield.tasks.trainsets import blend_compose
        from deepfield.tasks.trainsets.library import LibraryConfig, library_or_build
        lib_cfg = LibraryConfig()
        lib = library_or_build(library, lib_cfg, say=say)
        cfg = blend_compose.BlendComposeConfig()
        say(f"composing {n_val} validation blends ...")
        va = blend_compose.validation_set(lib, cfg, seed, n_val)
        ck = _checkpoint(checkpoint, out, MODEL)
        return train_stream(lambda step: blend_compose.training_batch(lib, cfg, seed, step, blends_per_step), va,
                            ref_index=lib.bands.index(lib.cfg.reference_band), zeropoint=lib.cfg.zeropoint,
                            steps=steps, lr=lr, seed=seed, device=device, threads=threads,
                            widths=tuple(int(w) for w in widths.split(",")), checkpoint=ck, stop_after=stop_after,
                            output=output,
                            record=dict(blend_config=dict(size=cfg.size, bands=lib.bands,
                                                          reference_band=lib.cfg.reference_band,
                                                          pixel_scale=lib.cfg.pixel_scale, zeropoint=lib.cfg.zeropoint),
                                        compose_config=cfg.model_dump(mode="json"),
                                        library=lib_cfg.model_dump(mode="json"), blends_per_step=blends_per_step,
                                        n_val=n_val, command=command))

    def fit(command: str):
        if composed:
            return fit_composed(command)
        cfg = BlendConfig(**({"bands": band_list} if band_list else {}))
        tr, va, seconds = training_examples(n_train, n_val, seed, cfg, workers, say)
        # the validation's magnitude cut and flux errors in the reference band, else r, else the reddest
        ref = next(b for b in (cfg.reference_band, "r", cfg.bands[-1]) if b in cfg.bands)
        return train(tr, va, ref_index=cfg.bands.index(ref), zeropoint=cfg.zeropoint, epochs=epochs,
                     batch=batch, lr=lr, seed=seed, device=device, threads=threads,
                     widths=tuple(int(w) for w in widths.split(",")),
                     record=dict(blend_config=cfg.model_dump(mode="json"), n_train=n_train, n_val=n_val,
                                 command=command, data_seconds=round(seconds, 1)))
    rec = _train("deblend", MODEL, fit, out)
    console.print(f"final val flux loss {rec['history'][-1]['val_flux']:.4f}, noiseless median |dF|/F (i < 23.5) "
                  f"{rec['history'][-1]['val_median_abs_flux_err_noiseless_i_lt_23p5']:.4f}")


@eval_app.command("deblend")
def eval_deblend(
    weights: Path = typer.Option(None, help="weights file (default: the shipped weights)"),
    n: int = typer.Option(300, min=10, help="held-out blends"),
    seed: int = typer.Option(20261124, min=0, help="seed of the held-out blends"),
    scarlet: bool = typer.Option(True, "--scarlet2/--no-scarlet2", help="also run scarlet2 on the same blends"),
    mag_limit: float = typer.Option(23.5, help="figures for members brighter than this (reference band)"),
    out: Path = typer.Option(None, help="write the figures as JSON here"),
) -> None:
    """Flux, colour and close-pair figures of the learned deblender beside SEP and scarlet2, and time per blend."""
    from deepfield.flows.evaluate.deblend import evaluate, format_report
    if scarlet:
        import importlib.util
        if importlib.util.find_spec("scarlet2") is None:  # not imported here: jax must not load before the fork
            fail("scarlet2 is not installed (pip install scarlet2), or pass --no-scarlet2")
    _evaluate(evaluate, format_report, weights, out, n=n, seed=seed, scarlet=scarlet, mag_limit=mag_limit)


@train_app.command("cluster")
def train_cluster(
    out: Path = typer.Option(None, "--out", "-o", help="weights file (default: the shipped models/weights/cluster_net.pt)"),
    backgrounds: int = typer.Option(96, min=2, help="background fields (6.8' each) rendered into the sky library"),
    clusters: int = typer.Option(3000, min=10, help="clusters and groups rendered into the sky library"),
    iters: int = typer.Option(6000, min=1, help="training steps"),
    batch: int = typer.Option(16, min=1, help="crops per step"),
    crop: int = typer.Option(128, min=32, help="side of a training crop, binned pixels (multiple of 32)"),
    lr: float = typer.Option(2e-3, min=0, help="peak learning rate (Adam)"),
    seed: int = typer.Option(0, min=0, help="seed of the library, split, initialisation and crops"),
    workers: int = typer.Option(2, min=1, help="processes rendering the library"),
    library: Path = typer.Option(None, help="the sky library's file (default: cluster_sky.npz under --cache; "
                                 "reused when it was made with the same options)"),
    cache: Path = typer.Option(Path(".cache"), help="directory of the default library file"),
    checkpoint: Path = typer.Option(None, help="checkpoint file (default: <out>.ckpt); the same command resumes from it"),
    stop_after: float = typer.Option(None, min=1, help="stop (checkpointed) after this many seconds of training"),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda:0"),
    threads: int = typer.Option(2, min=1, help="torch CPU threads"),
    bands: str = typer.Option(None, help="train on these of the library's bands, comma-separated (default all: "
                              "g,r,i,z); other bands write the band-set variant models/weights/cluster_net.<bands>.pt"),
) -> None:
    """Train the cluster finder (models/cluster_net.py) on skies at a realistic cluster density, composed from a
    library of simulator backgrounds and clusters rendered straight into binned pixels."""
    from deepfield.models.train_cluster import MODEL, train
    from deepfield.tasks.trainsets.cluster_sky import build_library, sky_source
    if crop % 32:
        fail(f"--crop {crop}: must be a multiple of 32")
    band_list = _bands(bands)
    out = _variant_out(out, MODEL, band_list, ["g", "r", "i", "z"])

    def fit(command: str):
        lib_path = library or cache / f"cluster_sky-seed{seed}.npz"
        lib = build_library(lib_path, seed=seed, n_backgrounds=backgrounds, n_clusters=clusters, workers=workers,
                            progress=say)
        if band_list:
            try:
                lib = lib.subset(band_list)
            except ValueError as exc:
                fail(f"{lib_path}: {exc}")
        data = dict(library=str(lib_path.name), backgrounds=backgrounds, clusters=clusters,
                    n_clusters_rich=int((lib.clusters.richness_target >= 15).sum()))
        return train(sky_source(lib, seed), iters=iters, batch=batch, crop_size=crop, lr=lr, seed=seed, device=device, threads=threads,
                     command=command, data=data, checkpoint=_checkpoint(checkpoint, out, MODEL), stop_after=stop_after)
    rec = _train("cluster", MODEL, fit, out)
    v = rec["final_val"]
    console.print(f"validation: completeness {v['completeness']:.2f} (richness >= 30, z <= 0.8), purity "
                  f"{v['purity']:.2f}, sigma_z/(1+z) {v['sigma_z']:.3f}, richness ratio {v['richness_ratio']:.2f}")


@eval_app.command("cluster")
def eval_cluster(
    weights: Path = typer.Option(None, help="weights file (default: the shipped weights)"),
    fields: int = typer.Option(32, min=1, help="held-out simulated fields (a square-ish grid)"),
    field_size: int = typer.Option(2048, min=512, help="side of each field, pixels"),
    clusters_per_field: float = typer.Option(1.0, min=0, help="clusters per field in the held-out fields (on average; realistic: at most 1)"),
    seed: int = typer.Option(20261126, min=0, help="seed of the held-out fields"),
    threshold: float = typer.Option(0.3, min=0.01, max=0.99, help="the cluster stage's heat-map threshold"),
    workers: int = typer.Option(2, min=1, help="processes simulating the fields"),
    work: Path = typer.Option(None, help="keep the fields, store and run here and reuse them next time"),
    device: str = typer.Option("cpu", help="torch device"),
    pixel_scale: float = typer.Option(None, "--pixel-scale", min=0.01, help="arcsec per pixel of the fields "
                                      "(default: the simulator's, 0.2; HSC 0.168, the Legacy Surveys 0.262, SDSS "
                                      "0.396): the same sky, seeing and depth on another grid"),
    out: Path = typer.Option(None, help="write the figures as JSON here"),
) -> None:
    """Completeness, purity, centre offset and redshift error of the cluster finder beside the red-sequence baseline."""
    from deepfield.flows.evaluate.cluster import evaluate, format_report
    _evaluate(evaluate, format_report, weights, out, n_fields=fields, size=field_size,
              clusters_per_field=clusters_per_field, seed=seed, threshold=threshold, workers=workers, work=work,
              device=device, pixel_scale=pixel_scale)


@eval_app.command("cluster-render")
def eval_cluster_render(
    weights: Path = typer.Option(None, help="weights file (default: the shipped weights)"),
    fields: int = typer.Option(4, min=1, help="fields simulated with GalSim, one rich cluster each"),
    field_size: int = typer.Option(2048, min=512, help="side of each field, pixels"),
    seed: int = typer.Option(20261130, min=0, help="seed of the fields"),
    workers: int = typer.Option(2, min=1, help="processes simulating the fields"),
    work: Path = typer.Option(None, help="keep the fields and their store here and reuse them next time"),
    device: str = typer.Option("cpu", help="torch device"),
    out: Path = typer.Option(None, help="write the figures as JSON here"),
) -> None:
    """The cluster finder's fast renderer (its training skies) against GalSim-rendered fields binned by the stage:
    pixel histograms, colours of the clusters' light and the network's scores on both."""
    from deepfield.flows.evaluate.cluster_render import compare, format_report
    _evaluate(compare, format_report, weights, out, n_fields=fields, size=field_size, seed=seed, workers=workers,
              work=work, device=device)
