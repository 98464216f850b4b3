"""Model registry: a name -> the network class that builds it, its shipped weights, model card, input spec and
version.

In the style of timm's registry, with the table written out here instead of filled by decorators at import:
the registry imports no network module (so it needs no torch and there is no import circle), and
`create_model(name)` imports the class only when it builds it. With `pretrained=True` (the default) it loads
the weights shipped in `models/weights/<name>.pt`; the weights file also holds the training record
(configuration, data, metrics), which `models/weights/<name>.train.json` repeats in JSON, and
`models/cards/<name>.md` is the human-readable model card (data, command, seed, metrics).

- `model_version(name)`: the first 12 hex digits of the shipped weights' sha256, which the ledger records
  so that tiles are redone when the weights change (`weights_version` for another weights file).
- `training_record(name, weights)` and `input_bands(name, weights)`: what a model was trained on, read from
  the JSON record beside the weights (no torch needed), so that a stage can say which bands it needs
  before anything runs.
- Band-set variants: besides the main weights a model may ship weights trained on another band set,
  `models/weights/<name>.<tag>.pt` (tag: the bands, e.g. `lens_resnet.grz.pt` for a g, r, z survey), each with
  its own record and card section. `variants(name)` lists them with their bands; `choose_variant(name, have)`
  picks the one a survey with the bands `have` can run (the most bands; the main weights on a tie). The run
  resolves each stage's variant before it starts (tasks.stages.registry.resolve_bands).
- `register_model`: a model from outside this package (a plugin stage's) joins the table.
- GPU settings (`GpuSettings`, the entry's `gpu`): the inputs per inference call and the autocast precision each
  network runs with on a CUDA device, and the tolerance that precision was accepted at. `create_model` on a
  cuda device runs the entry's `gpu.modules` (the model, or the submodules its stage calls) under
  torch.autocast (models.inference.autocast_modules) where `autocast` is set; on a CPU nothing changes. Both
  were chosen on an H200 by tests/benchmarks/bench_models.py (inputs per second per model, device, batch size
  and dtype, with the outputs' differences from float32): float32 for every network today (see _ENTRIES).

A new network is one module and one line in `_ENTRIES`.
"""
from __future__ import annotations

import glob
import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WEIGHTS_DIR = HERE / "weights"
CARDS_DIR = HERE / "cards"

__all__ = ["ModelEntry", "GpuSettings", "gpu_settings", "register_model", "list_models", "entry", "weights_version",
           "model_version", "training_record", "input_bands", "create_model", "variants", "choose_variant",
           "variant_weights"]


@dataclass(frozen=True)
class GpuSettings:
    """How a network runs on a CUDA device: `batch` inputs per inference call (a stamp for the stamp networks;
    the detector and the cluster finder take one tile or one field's planes a call), `autocast` the
    torch.autocast dtype ("bfloat16", "float16"; None: float32) for the submodules `modules` ("" the model
    itself; e.g. "generator" for model.generator), accepted because the outputs the stage uses stay within
    `tolerance` (in their own units) of float32's."""
    batch: int = 256
    autocast: str | None = None
    tolerance: float = 0.0
    modules: tuple[str, ...] = ("",)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    target: str  # "module:attribute", the class (or function) that builds the network from keyword arguments
    description: str
    weights_dir: Path = WEIGHTS_DIR
    cards_dir: Path = CARDS_DIR
    gpu: GpuSettings = GpuSettings()
    network: bool = True  # False: a table the stage searches (photoz_knn), not a network to benchmark or autocast

    @property
    def weights(self) -> Path:
        return self.weights_dir / f"{self.name}.pt"

    @property
    def card(self) -> Path:
        return self.cards_dir / f"{self.name}.md"

    def variant_weights(self, tag: str | None) -> Path:
        """The weights file of a band-set variant (`<name>.<tag>.pt`, e.g. lens_resnet.grz.pt); the main
        weights for None or ''."""
        return self.weights_dir / f"{self.name}.{tag}.pt" if tag else self.weights

    def builder(self):
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


# GPU settings, measured on an NVIDIA H200 (2026-12-04, tests/benchmarks/bench_models.py; README, Performance):
# float16 autocast ran every network at 0.83-1.07 times float32's speed (these small networks keep the GPU busy
# with their memory traffic and launches, not with arithmetic), and the anomaly score moved by 0.089 of its normal
# median under it (over its 0.05), so every network runs in float32 on a GPU; `autocast` stays available for
# larger networks. The tolerances are what a precision must keep to be chosen, on the outputs the stages use:
# lens probability; deblend flux fraction per pixel; the anomaly local score in units of its median on normal
# stamps; cluster and detection heat maps (0-1); photo-z quantiles. Batch sizes: the fastest of 256, 1024, 4096
# and 16384 stamps, or within 6 % of it at a quarter of its memory (anomaly: 4096, 0.64 GB).
_ENTRIES = (
    ModelEntry("lens_resnet", "deepfield.models.lens_cnn:LensResNet",
               "pre-activation ResNet strong-lens classifier, g r i z 48x48 stamps",
               gpu=GpuSettings(batch=1024, tolerance=0.01)),
    ModelEntry("merger_resnet", "deepfield.models.lens_cnn:LensResNet",
               "the lens ResNet trained as a merger (tidal tail) classifier, g r i z 48x48 stamps",
               gpu=GpuSettings(batch=1024, tolerance=0.01)),
    ModelEntry("deblend_unet", "deepfield.models.deblend_unet:DeblendUNet",
               "position-conditioned U-Net flux-fraction deblender, g r i z 48x48 stamps",
               gpu=GpuSettings(batch=1024, tolerance=0.02)),
    ModelEntry("anomaly_wgan", "deepfield.models.anomaly_gan:AnomalyGAN",
               "WGAN-GP generator, critic and encoder for anomaly scores, g r i 32x32 (variants g r i z, g r z)",
               gpu=GpuSettings(batch=4096, tolerance=0.05,
                               modules=("encoder", "generator", "critic.conv"))),
    ModelEntry("cluster_net", "deepfield.models.cluster_net:ClusterNet",
               "centre-heat-map cluster finder on 8x-binned g,r,i,z images",
               gpu=GpuSettings(batch=1, tolerance=0.01)),
    ModelEntry("detect_net", "deepfield.models.detect_net:DetectNet",
               "centre-heat-map source detector at the image's pixels, g r i z (any subset)",
               gpu=GpuSettings(batch=1, tolerance=0.01)),
    # not a network: the photo-z reference set, whose neighbour search runs on the CPU wherever the stage runs
    ModelEntry("photoz_knn", "deepfield.models.photoz:PhotoZReference",
               "k-nearest-neighbour photo-z reference set: simulated galaxies measured by the pipeline, g r i z "
               "(any 2+; variants u g r i z y, u g r i for surveys with all of their bands)", gpu=GpuSettings(batch=1), network=False),
    ModelEntry("photoz_cnn", "deepfield.models.photoz_cnn:PhotoZCNN",
               "photo-z CNN on 32x32 stamps with the aperture photometry, any 2+ of g r i z (Pasquet et al. 2019)",
               gpu=GpuSettings(batch=4096, tolerance=0.01)),
)
_REGISTRY: dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add a model to the registry (a plugin's); ValueError when the name is taken by another entry."""
    old = _REGISTRY.get(entry.name)
    if old is not None and old != entry:
        raise ValueError(f"model {entry.name!r} is already registered ({old.target})")
    _REGISTRY[entry.name] = entry
    return entry


def list_models(networks_only: bool = False) -> list[str]:
    """The registered models' names, sorted; `networks_only`: those that run a network (not a reference set)."""
    return sorted(n for n, e in _REGISTRY.items() if e.network or not networks_only)


def entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}") from None


def gpu_settings(name: str) -> GpuSettings:
    """The GPU batch size and precision of model `name` (GpuSettings)."""
    return entry(name).gpu


def user_cache_dir() -> Path:
    """deepfield's per-user cache (things made once per machine and reused by every run: Prefect's database
    template, the int8 detector compiled for this torch): $DEEPFIELD_CACHE_DIR, else $XDG_CACHE_HOME/deepfield,
    else ~/.cache/deepfield. Not created here."""
    import os
    root = os.environ.get("DEEPFIELD_CACHE_DIR")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deepfield"


def weights_version(path: str | Path) -> str:
    """sha256 (12 hex digits) of a weights file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def model_version(name: str, variant: str | None = None) -> str:
    """Version of the shipped weights of `name` (of its band-set `variant`), or 'untrained' when there are none."""
    w = entry(name).variant_weights(variant)
    return weights_version(w) if w.exists() else "untrained"


def variant_weights(name: str, variant: str | None) -> Path:
    """The shipped weights file of `name`'s band-set `variant` ('' or None: the main weights)."""
    return entry(name).variant_weights(variant)


def variants(name: str) -> dict[str, list[str]]:
    """The shipped weights of `name`: band-set tag ('' for the main weights) -> the bands they take, the main
    weights first, then the variants by tag."""
    e = entry(name)
    out = {"": input_bands(name)} if e.weights.exists() else {}
    for p in sorted(e.weights_dir.glob(f"{glob.escape(name)}.*.pt")):
        tag = p.name[len(name) + 1:-len(".pt")]
        if tag and "." not in tag:
            out[tag] = input_bands(name, p)
    return out


def choose_variant(name: str, have, ok=None) -> str | None:
    """The band-set variant of `name` a survey whose every field has the bands `have` can run: of those whose
    bands it has (and that `ok(tag)` accepts, when given), the one with the most bands, the main weights on a
    tie; None when there is none."""
    have = set(have)
    fits = [(len(b), tag == "", tag) for tag, b in variants(name).items()
            if set(b) <= have and (ok is None or ok(tag))]
    return max(fits)[2] if fits else None


def _weights_path(name: str, weights: str | Path | None) -> Path:
    path = Path(weights) if weights is not None else entry(name).weights
    if not path.exists():
        raise FileNotFoundError(f"{path}: no weights for model {name!r}; train them with "
                                f"`deepfield train` (see {entry(name).card.name})")
    return path


def training_record(name: str, weights: str | Path | None = None) -> dict:
    """The training record of the weights of `name` (the shipped ones, or the file `weights`): the JSON
    record written beside them (`<weights>.train.json`), or the record inside the weights file itself."""
    path = _weights_path(name, weights)
    beside = path.with_suffix(".train.json")
    if beside.exists():
        return json.loads(beside.read_text())
    import torch
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {k: v for k, v in state.items() if k != "state_dict"}


def input_bands(name: str, weights: str | Path | None = None) -> list[str]:
    """The bands, in channel order, that the weights of `name` take (from their training record)."""
    rec = training_record(name, weights)
    for key in ("arch", "stamp_config", "blend_config"):
        bands = (rec.get(key) or {}).get("bands")
        if bands:
            return list(bands)
    raise ValueError(f"{_weights_path(name, weights)}: the training record of model {name!r} names no bands")


def create_model(name: str, pretrained: bool = True, device: str = "cpu", weights: str | Path | None = None,
                 mixed_precision: bool = True, **kwargs):
    """Build model `name` (eval mode, on `device`); load its shipped weights (or the file `weights`). On a cuda
    device (with `mixed_precision`) the entry's GPU settings' modules run under autocast (module docstring).

    The architecture arguments saved with the weights are used unless `kwargs` override them.
    Raises FileNotFoundError naming the expected file when pretrained weights are missing."""
    import torch

    e = entry(name)
    state = None
    if pretrained or weights is not None:
        state = torch.load(_weights_path(name, weights), map_location="cpu", weights_only=False)
        kwargs = {**state.get("arch", {}), **kwargs}
    model = e.builder()(**kwargs)
    if state is not None:
        model.load_state_dict(state["state_dict"])
        model.training_info = {k: v for k, v in state.items() if k != "state_dict"}
    model = model.to(device).eval()
    if mixed_precision and e.gpu.autocast and torch.device(device).type == "cuda":
        from .inference import autocast_modules
        autocast_modules(model, e.gpu.modules, e.gpu.autocast)
    return model
