"""Local features kept per picture: compact, strongest first, extracted by the decoding workers from the picture
they decode for the encoder, and carried through saved batches (a resumed run keeps them) and Ray's columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbir.copies import match
from cbir.edits import EDITS
from cbir.images import discover, load_image
from cbir.local_features import KEEP, KEEP_SIDE, Features, extract, pack, to_keep
from cbir.preprocess import Preprocess
from indexer.decode import Decoder
from indexer.distributed import _records, decode_batch
from indexer.embed import to_chunk
from indexer.source import Source
from indexer.work import WorkDir

PRE = Preprocess()  # efficientnet_lite0's: 224 px, draft decoding from 256 px


def _same(a: Features | None, b: Features | None, px: float = 0.25) -> bool:
    """Equal as an index keeps them: descriptors exactly, positions to float16 (a quarter pixel at 400 px)."""
    assert a is not None and b is not None
    return a.size == b.size and np.array_equal(a.descriptors, b.descriptors) and \
        bool(np.all(np.abs(a.xy - b.xy) <= px))


def test_features_are_compact_strongest_first_and_match_a_copy(samples: Path) -> None:
    im = load_image(samples / "cat" / "chelsea.jpg")
    full, kept = extract(im, 500, KEEP_SIDE), to_keep(im)
    assert full.descriptors.dtype == np.uint8 and full.descriptors.shape == (len(full), 128)
    assert len(full) > KEEP >= len(kept) > 100 and max(kept.size) == KEEP_SIDE and max(extract(im).size) == 400
    strongest = {tuple(p) for p in np.round(full.strongest(len(kept) + 10).xy, 2)}
    assert np.mean([tuple(p) in strongest for p in np.round(kept.xy, 2)]) > 0.95  # the strongest of a larger set
    copy = extract(EDITS["crop 70% + JPEG 30"](im))
    assert match(copy, kept).verified
    assert not match(copy, to_keep(load_image(samples / "coffee" / "coffee.jpg"))).verified
    table = pack([kept, None, full])
    assert table.xy.dtype == np.float16 and table.descriptors.dtype == np.uint8 and len(table) == 3
    assert _same(table.get(0), kept) and table.get(1) is None and _same(table.get(2), full)


def test_decoding_workers_extract_them_and_saved_batches_keep_them(samples: Path, tmp_path: Path) -> None:
    source = Source.of(samples)
    files = discover(samples).files[:20]
    decoder = Decoder(source, files, PRE, workers=2, batch_size=8, features=True)
    try:
        batches = list(decoder.batches(files, 8))
    finally:
        decoder.close()
    items = [it for b in batches for it in b]
    here = [to_keep(load_image(samples / f, draft=PRE.draft_size)) for f in files]
    assert all(_same(it.features, h, px=1e-3) for it, h in zip(items, here, strict=True))  # the workers' = ours

    work = WorkDir(tmp_path / "idx", {"job": 1})
    work.open()
    for b in batches:
        work.write(to_chunk(b, np.zeros((len(b), 4), np.float32)))
    saved = [c.features.get(n) for c in work.chunks() for n in range(len(c.paths)) if c.features is not None]
    assert len(saved) == 20 and all(_same(s, h) for s, h in zip(saved, here, strict=True))


def test_ray_columns_carry_them_back(samples: Path) -> None:
    """Ray Data's batches hold fixed-shape columns: the features travel padded to KEEP and come back whole."""
    files = discover(samples).files[:6]
    batch = {"id": np.arange(6), "path": np.array(files)}
    columns = decode_batch(batch, Source.of(samples), PRE, features=True)
    back = _records({k: v for k, v in columns.items() if k != "pixels"})
    here = [to_keep(load_image(samples / f, draft=PRE.draft_size)) for f in files]
    assert all(_same(r.features, h) for r, h in zip(back, here, strict=True))
    assert "kp_count" not in decode_batch(batch, Source.of(samples), PRE)  # none asked, none carried
