"""The encoders: one decorator registers an encoder, one call creates it.

    enc = cbir.encoders.create("resnet50", weights="none", pooling="gem")
    vectors = enc.embed([pil_image])          # float32, L2-normalised rows
    same = cbir.encoders.from_config(enc.config)

Adding an encoder is one new module in this package (every public module here is imported on first lookup) or a
third-party module named by an entry point in the group ``cbir.encoders``. A family (`register_family`) answers a
name prefix for any model its library knows: `timm:NAME` (timm_family.py), `clip:ARCH` (clip_family.py, which also
embeds text), their weights from a file or the local Hugging Face cache (`_hub`).

Inside, as timm splits it: `_registry` (names -> entries), `_builder` (an entry -> its network), `_factory`
(`create`, `from_config`: the prepared cache and the numeric mode); the runtime beside them: `_device`, `_weights`,
`_prepared` (the cache), `_numeric` (fp32 / bf16 / int8 by measurement), `_onnx_*` (ONNX Runtime), `_memory`
(out of GPU memory: halve the batch), `_trainable` (the networks `cbir train` trains). This module re-exports;
what needs torch loads on first use, so that the query path (`_onnx_query`) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cbir.encoders._registry import (
    PRECISIONS,
    EncoderEntry,
    Family,
    get_entry,
    list_encoders,
    list_families,
    register,
    register_family,
    split_weights,
)
from cbir.errors import WeightsUnavailable

if TYPE_CHECKING:
    from cbir.encoders._factory import create, from_config
    from cbir.encoders._weights import Weights
    from cbir.encoders.base import POOLINGS, Encoder
    from cbir.preprocess import Preprocess

__all__ = ["Encoder", "EncoderEntry", "Family", "Preprocess", "WeightsUnavailable", "POOLINGS", "PRECISIONS",
           "register", "register_family", "create", "from_config", "list_encoders", "list_families", "get_entry",
           "split_weights", "Weights"]

_LAZY = {"Encoder": "cbir.encoders.base", "POOLINGS": "cbir.encoders.base", "create": "cbir.encoders._factory",
         "from_config": "cbir.encoders._factory", "Weights": "cbir.encoders._weights",
         "Preprocess": "cbir.preprocess"}  # numpy and PIL: not needed to read a name (the command's parser)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
