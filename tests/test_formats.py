"""Formats by content, not by name: HEIC, AVIF, Netpbm, camera RAW (DNG), a JPEG named .png, and what is left out."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cbir import formats
from cbir.images import decode_image, describe_left_out, discover, load_image
from tests.badfiles import jpeg_bytes, photo
from tests.rawfiles import dng

MOV = b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + b"\x00" * 64  # a QuickTime clip's first box
MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64


def _exif(orientation: int = 1, **tags: object) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    for key, value in tags.items():
        exif[int(key[1:], 16)] = value
    return exif


def write_mixed(folder):
    """The issue's folder: HEIC, AVIF, PPM, a JPEG named .png, a .txt named .jpg, a video, and more."""
    formats.enable_heif()
    folder.mkdir(parents=True, exist_ok=True)
    photo(seed=1).save(folder / "phone.heic", exif=_exif(6).tobytes())
    photo(seed=2).save(folder / "web.avif")
    photo(seed=3).save(folder / "scan.ppm")
    photo(seed=4).convert("L").save(folder / "grey.pgm")
    (folder / "wrong.png").write_bytes(jpeg_bytes(photo(seed=5)))
    (folder / "no_extension").write_bytes(jpeg_bytes(photo(seed=6)))
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "clip.mov").write_bytes(MOV)
    (folder / "clip2.mov").write_bytes(MOV)
    (folder / "clip.mp4").write_bytes(MP4)
    (folder / "notes.txt").write_text("not a picture")
    (folder / "scan.xmp").write_bytes(b"<x:xmpmeta/>")
    return folder


def test_discovery_reads_content_and_counts_what_it_leaves_out(tmp_path) -> None:
    found = discover(write_mixed(tmp_path / "mixed"))
    assert found.files == ["grey.pgm", "no_extension", "phone.heic", "scan.ppm", "text.jpg", "web.avif", "wrong.png"]
    assert found.left_out == {(formats.NOT_AN_IMAGE, ".mov"): 2, (formats.NOT_AN_IMAGE, ".mp4"): 1,
                              (formats.NOT_AN_IMAGE, ".txt"): 1, (formats.SIDECAR, ".xmp"): 1}
    assert describe_left_out(found.left_out)[0] == "2 .mov (not an image)"
    assert found.skipped == []  # text.jpg is named as a picture: its decoder says why it is not one


def test_every_picture_of_the_folder_decodes_and_the_impostor_does_not(tmp_path) -> None:
    folder = write_mixed(tmp_path / "mixed")
    for name in ("grey.pgm", "no_extension", "phone.heic", "scan.ppm", "web.avif", "wrong.png"):
        im = load_image(folder / name)
        assert im.mode == "RGB" and min(im.size) > 1, name
    with pytest.raises(Exception, match="not an image"):
        load_image(folder / "text.jpg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "HEIF", "AVIF"])
def test_exif_orientation_applies_to_every_format(tmp_path, fmt: str) -> None:
    """A landscape picture stored with orientation 6 (turn 90 degrees right) comes out as its turned twin."""
    formats.enable_heif()
    original = photo((160, 96), seed=7)
    path = tmp_path / f"turned.{fmt.lower()}"
    original.save(path, fmt, exif=_exif(6).tobytes(), **({"quality": 95} if fmt != "PNG" else {}))
    picture = decode_image(path)
    twin = original.transpose(Image.Transpose.ROTATE_270)
    assert picture.image.size == twin.size == picture.size == (96, 160)
    diff = np.abs(np.asarray(picture.image, np.int16) - np.asarray(twin, np.int16)).mean()
    assert diff < 12, f"{fmt}: mean difference {diff:.1f} from the turned original"


def test_sniffing_tells_pictures_from_videos_and_raw_from_tiff() -> None:
    assert formats.sniff(MOV) is None and formats.sniff(MP4) is None
    assert formats.sniff(b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom") == "raw"  # Canon CR3
    assert formats.sniff(b"II*\x00\x08\x00\x00\x00", "IMG_1.NEF") == "raw"
    assert formats.sniff(b"II*\x00\x08\x00\x00\x00", "scan.tif") == "pillow"
    assert formats.sniff(b"P6\n64 48\n255\n") == "pillow" and formats.sniff(b"Pizza") is None


@pytest.fixture()
def raw_files(tmp_path):
    pytest.importorskip("rawpy", reason="camera RAW is the [raw] extra (pip install -e '.[raw]')")
    small = np.asarray(photo((160, 120), seed=8))
    preview = np.asarray(photo((1200, 900), seed=8))
    (tmp_path / "developed.dng").write_bytes(dng(small, make="Canon", model="Canon EOS R5"))
    (tmp_path / "with_preview.dng").write_bytes(dng(small, preview=preview, orientation=6))
    return tmp_path, preview


def test_camera_raw_uses_its_preview_or_is_developed(raw_files) -> None:
    folder, preview = raw_files
    assert discover(folder).files == ["developed.dng", "with_preview.dng"]
    shown = decode_image(folder / "with_preview.dng")  # the camera's preview, turned as the RAW says
    twin = Image.fromarray(preview).transpose(Image.Transpose.ROTATE_270)
    assert shown.image.size == twin.size and shown.size == (120, 160)
    assert np.abs(np.asarray(shown.image, np.int16) - np.asarray(twin, np.int16)).mean() < 6
    developed = decode_image(folder / "developed.dng")  # no preview: LibRaw develops the mosaic (half size)
    assert developed.image.size == (80, 60) and developed.size == (160, 120)
    assert developed.exif is not None and developed.exif[0x0110] == "Canon EOS R5"


def test_raw_without_rawpy_is_left_out_with_the_way_to_fix_it(tmp_path, monkeypatch) -> None:
    """rawpy is an extra: without it, RAW files are counted with the command that brings it (the check is real: the
    same function that discovery calls is made to answer as an install without the extra would)."""
    (tmp_path / "a.nef").write_bytes(b"II*\x00\x08\x00\x00\x00")
    photo().save(tmp_path / "b.jpg")
    monkeypatch.setattr(formats, "has_rawpy", lambda: False)
    found = discover(tmp_path)
    assert found.files == ["b.jpg"] and found.left_out == {(formats.NO_RAWPY, ".nef"): 1}


def test_the_mixed_folder_is_indexed_and_every_other_file_counted(tmp_path, capsys) -> None:
    """The issue's folder, indexed: every picture in the index, each other file counted by reason (the run's summary
    and cbir info), the .txt named .jpg skipped with its reason."""
    from cbir import Index
    from cbir.cli import main

    folder = write_mixed(tmp_path / "mixed")
    out = tmp_path / "idx"
    assert main(["index", str(folder), "--out", str(out), "--device", "cpu", "-q"]) == 0
    summary = capsys.readouterr().out
    assert "indexed 6 images, skipped 1" in summary
    assert "left out: 2 .mov (not an image), 1 .xmp (XMP sidecar (its tags are read with its picture)), 1 .mp4 (not " \
           "an image), 1 .txt (not an image)" in summary
    assert "skipped text.jpg: not an image" in summary
    index = Index.open(out, device="cpu")
    assert sorted(index.rows().paths) == ["grey.pgm", "no_extension", "phone.heic", "scan.ppm", "web.avif",
                                          "wrong.png"]
    assert index.search(folder / "phone.heic", k=1)[0].path == "phone.heic"
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "left out  2 .mov (not an image), 1 .xmp (XMP sidecar" in info and "skipped text.jpg" in info
