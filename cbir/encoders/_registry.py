"""The registry: one decorator registers an encoder under a name; lookups load every encoder module once.

No torch here: listing encoders and reading an index's record must stay cheap (`cbir encoders`, the query path).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cbir.errors import CbirError

if TYPE_CHECKING:
    from cbir.encoders.base import Encoder

PACKAGE = __name__.rpartition(".")[0]  # cbir.encoders
PACKAGE_DIR = Path(__file__).parent
PRECISIONS = ("fp32", "bf16", "int8", "auto")  # the encoder's arithmetic (see _numeric.py); here, torch-free


@dataclass(frozen=True, kw_only=True)
class EncoderEntry:
    name: str
    factory: Callable[..., Encoder]
    description: str
    dims: dict[str, int | None]  # output dimension per pooling choice; None: set by the weights (trained models)
    default_pooling: str
    default_weights: str
    weights_status: Callable[[], str]  # one line: where the default weights are, or what is missing

    @property
    def poolings(self) -> tuple[str, ...]:
        return tuple(self.dims)


_REGISTRY: dict[str, EncoderEntry] = {}
_plugins_loaded = False


def register(name: str, *, description: str, dims: dict[str, int | None], default_pooling: str,
             default_weights: str = "imagenet", weights_status: Callable[[], str] | None = None):
    """Class-free registration: decorate a factory `f(weights: Weights, pooling, device, **options) -> Encoder`.

    A name is registered once: a second encoder under the same name is an error, not a silent replacement.
    `dims` declares the output dimension per pooling; `create` checks every encoder it builds against it.
    """

    def decorate(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        known = _REGISTRY.get(name)
        origin = (factory.__module__, factory.__qualname__)
        same_definition = (known is not None and "<locals>" not in factory.__qualname__
                           and (known.factory.__module__, known.factory.__qualname__) == origin)
        if known is not None and not same_definition:  # a module reloaded registers its own name again: fine
            raise CbirError(f"encoder name {name!r} is already registered by {known.factory.__module__}")
        _REGISTRY[name] = EncoderEntry(name=name, factory=factory, description=description, dims=dims,
                                       default_pooling=default_pooling, default_weights=default_weights,
                                       weights_status=weights_status or (lambda: "n/a"))
        return factory

    return decorate


def _load_plugins() -> None:
    """Every public module of the package (one per encoder family), then entry points of group cbir.encoders."""
    from importlib.metadata import entry_points  # 50-100 ms of imports: not for the command's parser

    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in pkgutil.iter_modules([str(PACKAGE_DIR)]):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{PACKAGE}.{mod.name}")
    for ep in entry_points(group="cbir.encoders"):
        ep.load()


def list_encoders() -> list[EncoderEntry]:
    _load_plugins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_entry(name: str) -> EncoderEntry:
    _load_plugins()
    if name not in _REGISTRY:
        raise CbirError(f"unknown encoder {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
