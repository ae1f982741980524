"""Metadata read at index time (date, camera, GPS, size, tags), and the filters that use it."""

from __future__ import annotations

import os
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from cbir import metadata
from cbir.errors import CbirError
from cbir.images import decode_image
from cbir.search.filters import Columns, FilterError, Where, check_known
from indexer.source import Source
from tests.badfiles import photo

XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description><dc:subject><rdf:Bag><rdf:li>product</rdf:li>'
       b"<rdf:li>red &amp; blue</rdf:li></rdf:Bag></dc:subject></rdf:Description></rdf:RDF></x:xmpmeta>")


def camera_photo(path, *, taken: str | None = "2023:07:14 10:22:01", make: str = "Google", model: str = "Pixel 7",
                 gps: bool = True, xmp: bytes = b"", seed: int = 0, subsec: str = "") -> None:
    exif = Image.Exif()
    exif[metadata.MAKE], exif[metadata.MODEL] = make, model
    if taken:
        exif.get_ifd(metadata.EXIF_IFD)[metadata.DATE_TIME_ORIGINAL] = taken
        if subsec:
            exif.get_ifd(metadata.EXIF_IFD)[metadata.SUBSEC_TIME_ORIGINAL] = subsec
    if gps:
        exif.get_ifd(metadata.GPS_IFD).update({1: "N", 2: (52.0, 22.0, 30.0), 3: "W", 4: (1.0, 30.0, 0.0)})
    photo((200, 120), seed=seed).save(path, "JPEG", exif=exif.tobytes(), **({"xmp": xmp} if xmp else {}))


def _read(path, sidecar: bytes | None = None) -> metadata.Meta:
    picture = decode_image(path)
    return metadata.read(picture.exif, picture.xmp, picture.size, os.stat(path).st_mtime_ns, sidecar)


def test_exif_date_camera_gps_size_and_embedded_keywords(tmp_path) -> None:
    camera_photo(tmp_path / "a.jpg", xmp=XMP, subsec="25")
    meta = _read(tmp_path / "a.jpg")
    assert meta.taken_exif and meta.taken_ns == metadata.wall_clock_ns(datetime(2023, 7, 14, 10, 22, 1)) + 250_000_000
    assert (meta.make, meta.model, meta.camera) == ("Google", "Pixel 7", "Google Pixel 7")
    assert meta.lat == pytest.approx(52.375) and meta.lon == pytest.approx(-1.5)
    assert (meta.width, meta.height) == (200, 120)
    assert meta.tags == ("product", "red & blue")


def test_file_time_when_the_picture_has_no_date_and_sidecar_tags(tmp_path) -> None:
    photo().save(tmp_path / "b.png")
    when = datetime(2021, 3, 4, 5, 6, 7)
    os.utime(tmp_path / "b.png", (when.timestamp(), when.timestamp()))
    (tmp_path / "b.xmp").write_bytes(XMP.replace(b"product", b"holiday"))
    meta = _read(tmp_path / "b.png", Source.of(tmp_path).sidecar("b.png"))
    assert not meta.taken_exif and meta.taken_ns == metadata.wall_clock_ns(when)  # the local calendar time
    assert meta.tags == ("holiday", "red & blue") and np.isnan(meta.lat) and meta.camera == ""


def test_damaged_exif_date_falls_back_to_the_file(tmp_path) -> None:
    camera_photo(tmp_path / "c.jpg", taken="0000:00:00 00:00:00", gps=False)
    meta = _read(tmp_path / "c.jpg")
    assert not meta.taken_exif and meta.camera == "Google Pixel 7"


def test_columns_round_trip() -> None:
    metas = [metadata.Meta(taken_ns=5, make="Canon", model="Canon EOS R5", tags=("a", "b"), own_tags=("a",)),
             metadata.Meta(taken_ns=7)]
    columns = metadata.to_columns(metas)
    assert set(columns) == set(metadata.COLUMNS) and columns["width"].dtype == np.int32
    for row, meta in enumerate(metas):  # NaN positions compare unequal: compare the rest
        back = metadata.from_columns(columns, row)
        assert np.isnan(back.lat) and np.isnan(back.lon) and back == metadata.Meta(**{**vars(meta), "lat": back.lat,
                                                                                         "lon": back.lon})
    assert metadata.camera_name("Canon", "Canon EOS R5") == "Canon EOS R5"


def test_tags_csv(tmp_path) -> None:
    good = tmp_path / "tags.csv"
    good.write_text("path,tag\nshop/a.jpg,product\n./shop/a.jpg,red\nb.jpg,product\n\n", encoding="utf-8")
    given = metadata.read_tags_csv(good)
    assert given.by_path == {"shop/a.jpg": ["product", "red"], "b.jpg": ["product"]}
    assert given.merged("shop/a.jpg", ["xmp"]) == ("xmp", "product", "red")
    (tmp_path / "bad.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(CbirError, match="header 'path,tag'"):
        metadata.read_tags_csv(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("path,tag\na.jpg\n")
    with pytest.raises(CbirError, match="line 2"):
        metadata.read_tags_csv(tmp_path / "short.csv")


def _columns() -> Columns:
    day = metadata.wall_clock_ns(datetime(2023, 1, 1))
    rows = [  # path, days after 2023-01-01, make, model, tags
        ("Holidays/2023/a.jpg", 10, "Google", "Pixel 7", "beach\nfamily"),
        ("Holidays/b.jpg", 400, "Google", "Pixel 7", "beach"),
        ("Holidays2/c.jpg", 20, "Canon", "Canon EOS R5", ""),
        ("Work/d.jpg", -5, "", "", "Product"),
        ("e.jpg", 30, "Canon", "Canon EOS R5", "product\nbeach"),
    ]
    meta = metadata.to_columns([metadata.Meta(taken_ns=day + d * 86_400 * 10**9, make=mk, model=md,
                                              tags=tuple(metadata.split_tags(t))) for _, d, mk, md, t in rows])
    return Columns([r[0] for r in rows], meta)


def _rows(columns: Columns, **words) -> list[int]:
    where = Where.parse(**words)
    check_known(where, [columns])
    return np.flatnonzero(columns.mask(where)).tolist()


def test_each_filter_and_their_combination() -> None:
    c = _columns()
    assert _rows(c, folder="Holidays") == [0, 1]  # its sub-folders too, not the folder Holidays2
    assert _rows(c, folder="Holidays/2023/") == [0]
    assert _rows(c, after="2023-01-01", before="2024-01-01") == [0, 2, 4]
    assert _rows(c, before="2023") == [3]
    assert _rows(c, camera="pixel 7") == [0, 1] and _rows(c, camera="Canon") == [2, 4]
    assert _rows(c, camera="Google Pixel 7") == [0, 1]
    assert _rows(c, tags=["product"]) == [3, 4]  # any case
    assert _rows(c, tags=["beach", "product"]) == [4]  # several tags: all of them
    assert _rows(c, folder="Holidays", after="2023-06-01", camera="Pixel 7", tags=["beach"]) == [1]
    assert _rows(c, folder="Work", camera="Pixel 7") == []  # known values that match nothing together
    assert not Where.parse() and Where.parse(tags=["x"])


def test_unknown_values_and_bad_dates_are_plain_errors() -> None:
    c = _columns()
    with pytest.raises(FilterError, match="no folder 'Holiday' in this index; folders: 'Holidays', 'Holidays/2023'"):
        _rows(c, folder="Holiday")
    with pytest.raises(FilterError, match="no camera 'Pixel 8'.*'Google Pixel 7'"):
        _rows(c, camera="Pixel 8")
    with pytest.raises(FilterError, match="no tag 'sunset'"):
        _rows(c, tags=["sunset"])
    with pytest.raises(FilterError, match="'2023-13-01' is not a date; write it as YYYY-MM-DD"):
        Where.parse(after="2023-13-01")
    with pytest.raises(FilterError, match="no date is in that range"):
        Where.parse(after="2024-01-01", before="2023-01-01")


def test_where_reads_back_as_typed() -> None:
    where = Where.parse(folder="/Holidays/", after="2023-01-01", before="2023-06-01T12:30", camera="  Pixel   7 ",
                        tags=["a", "a", " b "])
    assert where.describe() == "--folder Holidays --after 2023-01-01 --before 2023-06-01T12:30:00 --camera 'Pixel 7' " \
                               "--tag 'a' --tag 'b'"
    assert Where.parse(**{k: v for k, v in where.to_query().items() if k != "tag"}, tags=where.to_query()["tag"]) \
        == where


def test_a_mask_is_kept_and_shared_read_only() -> None:
    c = _columns()
    first = c.mask(Where.parse(tags=["beach"]))
    assert c.mask(Where.parse(tags=["beach"])) is first and not first.flags.writeable
    assert c.cameras() == {"Canon EOS R5": 2, "Google Pixel 7": 2}
    assert c.tags() == {"Product": 1, "beach": 3, "family": 1, "product": 1}
    assert c.folders() == ["Holidays", "Holidays/2023", "Holidays2", "Work"]
