"""Reading images: discovery rules, colour modes, EXIF, and a plain reason for every bad file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.errors import CbirError, ImageError, QueryImageError
from cbir.images import discover, load_image, load_query
from tests.badfiles import EXPECTED_OK, EXPECTED_SKIPS, bomb_png, jpeg_bytes, photo, write_bad_files


@pytest.fixture()
def bad(tmp_path: Path) -> Path:
    return write_bad_files(tmp_path / "bad")


def test_discovery_is_sorted_recursive_case_insensitive_and_skips_junk(tmp_path: Path) -> None:
    for rel in ["b/2.JPG", "b/1.png", "a.webp", "c/d/e.TIFF", ".hidden/x.jpg", "@eaDir/t.jpg", "._x.jpg",
                "notes.txt", "skip_me/y.jpg"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    found = discover(tmp_path, exclude=["skip_me"])
    assert found.files == ["a.webp", "b/1.png", "b/2.JPG", "c/d/e.TIFF"]


def test_symlinked_folder_followed_once_and_loops_do_not_hang(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    photo().save(tmp_path / "real" / "p.jpg")
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink(tmp_path, tmp_path / "real" / "loop")
    os.symlink(tmp_path / "missing.jpg", tmp_path / "broken.jpg")
    found = discover(tmp_path)
    assert found.files == ["link/p.jpg"]  # 'link' sorts first; 'real' is the same folder, visited once
    reasons = {s.path: s.reason for s in found.skipped}
    assert "broken.jpg" in reasons and "broken symlink" in reasons["broken.jpg"]
    assert any("already visited" in r for r in reasons.values())


def test_wrong_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="folder not found"):
        discover(tmp_path / "nope")
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("name", sorted(EXPECTED_SKIPS))
def test_bad_file_gives_its_reason(bad: Path, name: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image(bad / name)
    assert EXPECTED_SKIPS[name] in str(info.value)


@pytest.mark.parametrize("name", EXPECTED_OK)
def test_odd_but_valid_files_decode_to_rgb(bad: Path, name: str) -> None:
    im = load_image(bad / name)
    assert im.mode == "RGB" and im.size[0] >= 1


def test_transparency_is_composited_over_white(bad: Path) -> None:
    arr = np.asarray(load_image(bad / "palette_alpha.png"))
    assert tuple(arr[10, 5]) == (255, 255, 255)
    assert tuple(arr[10, 50]) == (200, 30, 30)


def test_sixteen_bit_is_scaled_not_clipped(bad: Path) -> None:
    arr = np.asarray(load_image(bad / "sixteen_bit.png"))
    ref = np.asarray(photo(seed=4).convert("L"))
    assert np.abs(arr[..., 0].astype(int) - ref.astype(int)).max() <= 1


def test_exif_rotated_photo_matches_its_pixel_rotated_twin(tmp_path: Path) -> None:
    base = photo((160, 100), seed=20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    (tmp_path / "tagged.jpg").write_bytes(jpeg_bytes(base, exif=exif.tobytes()))
    (tmp_path / "twin.jpg").write_bytes(jpeg_bytes(base.transpose(Image.Transpose.ROTATE_270)))
    tagged, twin = load_image(tmp_path / "tagged.jpg"), load_image(tmp_path / "twin.jpg")
    assert tagged.size == twin.size == (100, 160)
    diff = np.abs(np.asarray(tagged, dtype=int) - np.asarray(twin, dtype=int)).mean()
    assert diff < 4


def test_animated_gif_uses_first_frame(bad: Path) -> None:
    first = np.asarray(load_image(bad / "animated.gif"), dtype=int)
    ref = np.asarray(photo(seed=6), dtype=int)
    assert np.abs(first - ref).mean() < 25  # GIF palette quantisation only


def test_a_query_says_what_is_wrong_with_it(tmp_path: Path) -> None:
    """Every way a query comes in (search, --copies, the API) gets these messages from load_query, and an image
    problem is a CbirError like any other (the command prints it as one line)."""
    with pytest.raises(CbirError, match="query image not found: .*nope.jpg"):
        load_query(tmp_path / "nope.jpg")
    with pytest.raises(CbirError, match="not an image file but a folder"):
        load_query(tmp_path)
    with pytest.raises(QueryImageError, match="cannot use the query image: not an image") as info:
        load_query(b"GIF89a but not really")
    assert info.value.reason.startswith("not an image") and isinstance(info.value, CbirError)
    assert issubclass(ImageError, CbirError) and load_query(io.BytesIO(jpeg_bytes(photo()))).size == (160, 120)


def test_bytes_uploads_and_bombs() -> None:
    assert load_image(jpeg_bytes(photo())).size == (160, 120)
    with pytest.raises(ImageError, match="empty upload"):
        load_image(b"")
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb_png())
    with pytest.raises(ImageError, match="not an image"):
        load_image(io.BytesIO(b"GIF89a but not really"))


def test_draft_decoding_keeps_enough_pixels(tmp_path: Path) -> None:
    big = photo((2400, 1800), seed=30)
    (tmp_path / "big.jpg").write_bytes(jpeg_bytes(big))
    im = load_image(tmp_path / "big.jpg", draft=256)
    assert min(im.size) >= 256 and im.size[0] < 2400


def test_fifo_named_like_an_image_is_skipped_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    photo().save(tmp_path / "ok.jpg")
    found = discover(tmp_path)
    assert found.files == ["ok.jpg"]
    assert [(s.path, s.reason) for s in found.skipped] == [("pipe.jpg", "not a regular file")]
