"""Where cbir keeps what it can make again but would rather not: int8 models, precision measurements."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """$CBIR_CACHE/<kind>, default ~/.cache/cbir/<kind>; deleting it only costs time."""
    path = Path(os.environ.get("CBIR_CACHE") or Path.home() / ".cache" / "cbir") / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_key(config: dict) -> str:
    """One cached derived model per network, pooling, input size, weights and options (a fused encoder's view)."""
    import hashlib
    import json

    sha = str(config["weights"].get("sha256", "nohash"))[:16]
    key = f"{config['name']}-{config['pooling']}-{config['preprocess']['size']}-{sha}"
    options = config.get("options") or {}
    if options:
        key += "-" + hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    return key
