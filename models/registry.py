"""Model registry: a name -> how to build the network, where its shipped weights and model card are.

In the style of timm's registry: a model module decorates a builder with `@register_model(name, ...)`;
`create_model(name)` builds it and, with `pretrained=True` (the default), loads the weights shipped in
`models/weights/<name>.pt`. The weights file also holds the training configuration and metrics, and
`models/cards/<name>.md` is the human-readable model card (data, command, seed, epochs, metrics).
Stages load their models only through `create_model`, so the ledger can record `model_version(name)`
(the first 12 hex digits of the weights' sha256) and re-run tiles when the weights change.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
WEIGHTS_DIR = HERE / "weights"
CARDS_DIR = HERE / "cards"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., object]
    description: str

    @property
    def weights(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.pt"

    @property
    def card(self) -> Path:
        return CARDS_DIR / f"{self.name}.md"


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str = ""):
    """Decorator: register `builder(**kwargs) -> torch.nn.Module` under `name`."""
    def wrap(fn):
        if name in _REGISTRY and _REGISTRY[name].builder is not fn:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return wrap


def _load_all() -> None:
    from . import anomaly_gan, cluster_net, deblend_unet, lens_cnn  # noqa: F401  (register their models)


def list_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def entry(name: str) -> ModelEntry:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}") from None


def weights_version(path: str | Path) -> str:
    """sha256 (12 hex digits) of a weights file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def model_version(name: str) -> str:
    """Version of the shipped weights of `name`, or 'untrained' when there are none."""
    w = entry(name).weights
    return weights_version(w) if w.exists() else "untrained"


def create_model(name: str, pretrained: bool = True, device: str = "cpu", weights: str | Path | None = None,
                 **kwargs):
    """Build model `name` (eval mode, on `device`); load its shipped weights (or the file `weights`).

    The architecture arguments saved with the weights are used unless `kwargs` override them.
    Raises FileNotFoundError naming the expected file when pretrained weights are missing."""
    import torch

    e = entry(name)
    state = None
    if pretrained or weights is not None:
        path = Path(weights) if weights is not None else e.weights
        if not path.exists():
            raise FileNotFoundError(f"{path}: no weights for model {name!r}; train them with "
                                    f"`deepfield train` (see {e.card.name})")
        state = torch.load(path, map_location="cpu", weights_only=False)
        kwargs = {**state.get("arch", {}), **kwargs}
    model = e.builder(**kwargs)
    if state is not None:
        model.load_state_dict(state["state_dict"])
        model.training_info = {k: v for k, v in state.items() if k != "state_dict"}
    return model.to(device).eval()
