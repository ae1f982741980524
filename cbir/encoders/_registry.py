"""The registry: one decorator registers an encoder under a name; lookups load every encoder module once.

A family (`register_family`) registers a name prefix instead: `timm:NAME` and `clip:ARCH` are entries made on
request for any NAME the family's library knows, by the family's factory with NAME as its first argument. A prefix
is never an encoder name (no registered name has a colon), so `name:FILE` in a fused name stays unambiguous: the
part `timm:convnext_tiny:FILE` is the family name `timm:convnext_tiny` with weights FILE.

No torch here: listing encoders and reading an index's record must stay cheap (`cbir encoders`, the query path).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
    hub: bool = False  # a family's entry: --weights may name a pretrained tag found in the Hugging Face cache

    @property
    def poolings(self) -> tuple[str, ...]:
        return tuple(self.dims)


@dataclass(frozen=True, kw_only=True)
class Family:
    """Encoders named `PREFIX:NAME` for any NAME the family's library knows; `factory(NAME, weights=, pooling=,
    device=, **options)` builds one, and `status(NAME)` says where its weights would be looked for."""

    prefix: str
    factory: Callable[..., Encoder]
    description: str
    poolings: tuple[str, ...]
    default_pooling: str
    examples: tuple[str, ...]
    status: Callable[[str | None], str]  # where NAME's weights are looked for (None: the family's, in general)


SEP = ":"
_REGISTRY: dict[str, EncoderEntry] = {}
_FAMILIES: dict[str, Family] = {}
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


def register_family(prefix: str, *, description: str, poolings: tuple[str, ...], default_pooling: str,
                    examples: tuple[str, ...], status: Callable[[str | None], str]):
    """Decorate a factory `f(name, weights: Weights, pooling, device, **options) -> Encoder` for `PREFIX:name`."""
    if not prefix.isidentifier() or SEP in prefix:
        raise CbirError(f"a family prefix is a plain word, not {prefix!r}")

    def decorate(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        _FAMILIES[prefix] = Family(prefix=prefix, factory=factory, description=description, poolings=poolings,
                                   default_pooling=default_pooling, examples=examples, status=status)
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


def list_families() -> list[Family]:
    _load_plugins()
    return [_FAMILIES[k] for k in sorted(_FAMILIES)]


def family_of(name: str) -> tuple[Family, str] | None:
    """(family, NAME) for a name `PREFIX:NAME` of a registered family, else None."""
    prefix, sep, rest = name.partition(SEP)
    if not sep:
        return None
    _load_plugins()
    return (_FAMILIES[prefix], rest) if prefix in _FAMILIES else None


def split_weights(text: str) -> tuple[str, str | None]:
    """'name[:weights]' -> (name, weights or None); a family's name keeps its prefix: 'timm:convnext_tiny[:FILE]'."""
    name, _, weights = text.partition(SEP)
    if family_of(text) is not None:
        arch, _, weights = weights.partition(SEP)
        name = f"{name}{SEP}{arch}"
    return name, weights or None


def get_entry(name: str) -> EncoderEntry:
    _load_plugins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    found = family_of(name)
    if found is None:
        families = ", ".join(f"{f.prefix}:NAME" for f in _FAMILIES.values())
        raise CbirError(f"unknown encoder {name!r}; available: {', '.join(sorted(_REGISTRY))}"
                        f"{', or a model of a family: ' + families if families else ''} (cbir encoders lists them)")
    family, arch = found
    if not arch:
        raise CbirError(f"encoder {name!r}: name the model after the prefix, e.g. {family.examples[0]}")
    return EncoderEntry(name=name, factory=partial(family.factory, arch), description=family.description,
                        dims=dict.fromkeys(family.poolings), default_pooling=family.default_pooling,
                        default_weights="hub", weights_status=partial(family.status, arch), hub=True)
