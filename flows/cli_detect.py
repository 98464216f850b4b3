"""`deepfield train library`, `deepfield train detect` and `deepfield eval detect`: the rendered galaxy library,
the learned detector's training (with its int8 activation ranges) and the detection evaluation on whole
simulated fields. Registered on flows/cli_models.py's command groups (flows/cli.py imports this module); the
README's command reference mirrors every option."""
from __future__ import annotations

from pathlib import Path

import typer

from deepfield.models.progress import say

from .cli_common import console, fail
from .cli_models import LIBRARY_DIR, _checkpoint, _evaluate, _train, eval_app, train_app


def _stage_params(items: list[str] | None, option: str) -> dict:
    """{key: value} from KEY=VALUE strings, each value read as YAML (2.0 a number, true a boolean, sep a
    string); a malformed item is a one-line error naming it."""
    import yaml

    out = {}
    for item in items or []:
        key, sep_, value = item.partition("=")
        if not sep_ or not key.strip():
            fail(f"{option} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError as exc:
            fail(f"{option} {item!r}: cannot read the value: {exc}")
    return out


@eval_app.command("detect")
def eval_detect(
    weights: Path = typer.Option(None, help="U-Net deblender weights: run the deblend stage with templates: unet "
                                 "and these weights (default: the default run's deblender, symmetric templates)"),
    fields: int = typer.Option(2, min=1, help="held-out simulated fields"),
    size: int = typer.Option(1024, "--size", "--field-size", min=256, help="side of each field, pixels"),
    seed: int = typer.Option(20261127, min=0, help="seed of the held-out fields"),
    detect_param: list[str] = typer.Option(None, "--detect-param", metavar="KEY=VALUE",
                                           help="a detect-stage parameter over the default run configuration's "
                                           "(repeatable), e.g. --detect-param thresh=2"),
    workers: int = typer.Option(2, min=1, help="processes simulating the fields"),
    work: Path = typer.Option(None, help="keep the simulated fields and their store here and reuse them next time"),
    device: str = typer.Option("cpu", help="torch device"),
    shifted: bool = typer.Option(False, "--shifted/--no-shifted", help="fields unlike the simulator's defaults, as "
                                 "another survey or generator might make them: Moffat PSFs of index 2.5, seeing "
                                 "x1.25, PSF ellipticity up to 0.08, 0.3 mag shallower"),
    pixel_scale: float = typer.Option(None, "--pixel-scale", min=0.01, help="arcsec per pixel of the fields "
                                      "(default: the simulator's, 0.2; HSC 0.168, the Legacy Surveys 0.262): the "
                                      "same sky, seeing and depth on another grid"),
    out: Path = typer.Option(None, help="write the figures as JSON here"),
) -> None:
    """Completeness (blended and isolated galaxies), close pairs, blended-galaxy flux error, purity and CPU time
    of the pipeline's detection stages beside SEP alone, on whole simulated fields against the full truth."""
    from deepfield.flows.evaluate.detection import detection_stages, evaluate, format_report
    params = _stage_params(detect_param, "--detect-param")
    try:
        detection_stages(params)  # a mistyped key or value is one line, before anything is simulated
    except ValueError as exc:
        fail(str(exc))
    _evaluate(evaluate, format_report, weights, out, n_fields=fields, size=size, seed=seed, detect_params=params,
              workers=workers, work=work, device=device, shifted=shifted, pixel_scale=pixel_scale)


@train_app.command("library")
def train_library(
    out: Path = typer.Option(LIBRARY_DIR, "--out", "-o", help="directory of the library (library.npz, library.json)"),
    galaxies: int = typer.Option(16000, min=10, help="galaxies to render"),
    seed: int = typer.Option(0, min=0, help="seed of the galaxies"),
    workers: int = typer.Option(2, min=1, help="processes rendering with GalSim"),
) -> None:
    """Render the library of noiseless galaxy and star images that training scenes are composed from (once;
    `train detect` builds it itself when it is missing). About 6 minutes and 820 MB with the defaults."""
    from deepfield.tasks.trainsets.library import LibraryConfig, build_library, load_library
    cfg = LibraryConfig(galaxies=galaxies, seed=seed)
    try:
        load_library(out, cfg)
        console.print(f"{out}: already holds this library")
        return
    except (FileNotFoundError, ValueError):
        pass
    lib = build_library(cfg, out, workers, progress=lambda d, n: say(f"  {d}/{n} galaxies") if d % 2000 == 0 or d == n
                        else None)
    console.print(f"library: {out} ({', '.join(f'{len(v)} on {s}x{s} px' for s, v in lib.gal_info.items())})")


def _weights_and_record(path: Path) -> tuple[dict, dict]:
    """(record, state_dict) of a weights file written by `deepfield train`."""
    import torch
    if not path.exists():
        fail(f"{path}: no such weights file")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in saved:
        fail(f"{path}: not a weights file written by `deepfield train` (no state_dict)")
    from deepfield.tasks.stages.detect import INT8_KEY
    rec = {k: v for k, v in saved.items() if k not in ("state_dict", INT8_KEY)}
    return rec, saved["state_dict"]


def _int8_ranges(done: tuple[dict, dict], inputs, command: str, seed: int) -> dict:
    """The detector's int8 activation ranges over `inputs` (validation scenes) for the weights file, noted in
    the record `done[0]`."""
    import warnings

    from deepfield.models.detect_net import DetectNet, int8_calibration
    from deepfield.tasks.stages.detect import INT8_KEY
    rec, state = done
    model = DetectNet(**rec.get("arch", {}))
    model.load_state_dict(state)
    say(f"int8 activation ranges over {len(inputs)} validation scenes ...")
    with warnings.catch_warnings():  # torch's notices on its quantisation API (see models/cards/detect_net.md)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        cal = int8_calibration(model.eval(), inputs)
    rec["int8"] = {"scenes": len(inputs), "seed": seed, "command": command,
                   "method": "PyTorch FX post-training quantisation, x86 default configuration"}
    return {INT8_KEY: cal}


@train_app.command("detect")
def train_detect(
    out: Path = typer.Option(None, "--out", "-o",
                             help="weights file (default: the shipped models/weights/detect_net.pt)"),
    library: Path = typer.Option(LIBRARY_DIR, help="the rendered galaxy library (built there when missing)"),
    steps: int = typer.Option(3000, min=1, help="training steps"),
    batch: int = typer.Option(16, min=1, help="composed scenes per step"),
    size: int = typer.Option(96, min=32, help="side of a training scene, pixels (multiple of 4)"),
    lr: float = typer.Option(3e-3, min=0, help="peak learning rate (one-cycle schedule)"),
    val_scenes: int = typer.Option(200, min=1, help="validation scenes, composed as a plain field"),
    seed: int = typer.Option(0, min=0, help="seed of the scenes and the initialisation"),
    checkpoint: Path = typer.Option(None, help="checkpoint file; a run that finds one of the same configuration "
                                    "resumes from it (default: <out>.ckpt)"),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda:0"),
    threads: int = typer.Option(2, min=1, help="torch CPU threads"),
    widths: str = typer.Option("16,32,48", help="channel widths at strides 1, 2 and 4, comma-separated"),
    stop_after: int = typer.Option(None, min=1, help="stop after this many steps of the schedule (checkpoint "
                                   "kept); the same command without it goes on from there"),
    pixel_scales: str = typer.Option(None, help="LO,HI arcsec: half the training scenes on pixels of a side "
                                     "drawn log-uniformly in this range (composed on the library's 0.2\" grid and "
                                     "rebinned), for other surveys' grids (default: every scene on the library's)"),
    calibrate_only: bool = typer.Option(False, "--calibrate-only", help="no training: add the int8 activation "
                                        "ranges (from the validation scenes) to the weights file --out"),
) -> None:
    """Train the learned detector (models/detect_net.py) on scenes composed from the galaxy library, then
    measure its int8 activation ranges on the validation scenes (the detect stage's `precision: int8`)."""
    from deepfield.models.registry import entry
    from deepfield.models.train_detect import MODEL, train
    from deepfield.tasks.trainsets.detection import DetectTrainConfig, training_batch, validation_set
    from deepfield.tasks.trainsets.library import LibraryConfig, library_or_build
    if size % 4:
        fail(f"--size {size}: must be a multiple of 4")
    w = tuple(int(v) for v in widths.split(","))
    if len(w) != 3:
        fail(f"--widths {widths}: give three widths")
    scales = None
    if pixel_scales is not None:
        try:
            scales = tuple(float(v) for v in pixel_scales.split(","))
        except ValueError:
            scales = ()
        if len(scales) != 2 or not 0 < scales[0] <= scales[1]:
            fail(f"--pixel-scales {pixel_scales!r}: give LO,HI in arcsec, 0 < LO <= HI")

    def fit(command: str):
        lib_cfg = LibraryConfig()
        lib = library_or_build(library, lib_cfg, say=say)
        cfg = DetectTrainConfig()
        cfg.compose.size = size
        cfg.compose.pixel_scales = scales
        say(f"composing {val_scenes} validation scenes ...")
        val = validation_set(lib, cfg, seed, val_scenes)
        if calibrate_only:
            done = _weights_and_record(out or entry(MODEL).weights)
        else:
            ck = _checkpoint(checkpoint, out, MODEL)
            done = train(lambda step: training_batch(lib, cfg, seed, step, batch), val, steps=steps, lr=lr,
                         seed=seed, bands=tuple(lib.bands), widths=w, device=device, threads=threads, checkpoint=ck,
                         stop_after=stop_after,
                         record=dict(command=command, library=lib_cfg.model_dump(mode="json"),
                                     scenes=cfg.model_dump(mode="json"), batch=batch, val_scenes=val_scenes))
        if done is None:
            return None
        return (*done, _int8_ranges(done, val["x"], command, seed))
    rec = _train("detect", MODEL, fit, out)
    best = rec["val"][f"{rec['threshold']:.1f}"]
    console.print(f"validation (plain scenes): threshold {rec['threshold']}, completeness {best['completeness']:.3f}, "
                  f"purity {best['purity']:.3f}")
