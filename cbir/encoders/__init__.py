"""The encoders: one decorator registers an encoder, one call creates it.

    enc = cbir.encoders.create("resnet50", weights="none", pooling="gem")
    vectors = enc.embed([pil_image])          # float32, L2-normalised rows
    same = cbir.encoders.from_config(enc.config)

Adding an encoder is one new module in this package (every public module here is imported on first lookup) or a
third-party module named by an entry point in the group ``cbir.encoders``.

Inside, as timm splits it: `_registry` (names -> entries), `_builder` (an entry -> its network), `_factory`
(`create`, `from_config`: the prepared cache and the numeric mode); the runtime beside them: `_device`, `_weights`,
`_prepared` (the cache), `_numeric` (fp32 / bf16 / int8 by measurement), `_onnx_*` (ONNX Runtime), `_trainable`
(the networks `cbir train` trains). This module re-exports; what needs torch loads on first use, so that the
query path (`_onnx_query`) and `cbir encoders` never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cbir.encoders._registry import PRECISIONS, EncoderEntry, get_entry, list_encoders, register
from cbir.errors import WeightsUnavailable

if TYPE_CHECKING:
    from cbir.encoders._factory import create, from_config
    from cbir.encoders._weights import Weights
    from cbir.encoders.base import POOLINGS, Encoder
    from cbir.preprocess import Preprocess

__all__ = ["Encoder", "EncoderEntry", "Preprocess", "WeightsUnavailable", "POOLINGS", "PRECISIONS", "register",
           "create", "from_config", "list_encoders", "get_entry", "Weights"]

_LAZY = {"Encoder": "cbir.encoders.base", "POOLINGS": "cbir.encoders.base", "create": "cbir.encoders._factory",
         "from_config": "cbir.encoders._factory", "Weights": "cbir.encoders._weights",
         "Preprocess": "cbir.preprocess"}  # numpy and PIL: not needed to read a name (the command's parser)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
