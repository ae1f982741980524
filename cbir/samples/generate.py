"""Re-create the bundled sample collection from the photos inside scikit-image's wheel.

    pip install scikit-image && python cbir/samples/generate.py

Each subject gets a folder: the photo scaled to at most 480 px, and three generated variants (a crop,
a mirror image with a colour shift, a rotated copy), so that a query finds its relatives first.
Not needed at run time; the generated JPEGs are committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from skimage import data

HERE = Path(__file__).parent
SUBJECTS = {
    "cat": "chelsea",
    "coffee": "coffee",
    "astronaut": "astronaut",
    "rocket": "rocket",
    "camera": "camera",
    "bricks": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "retina": "retina",
}


def main() -> None:
    for folder, name in SUBJECTS.items():
        arr = getattr(data, name)()
        im = Image.fromarray(np.asarray(arr)).convert("RGB")
        im.thumbnail((480, 480), Image.LANCZOS)
        out = HERE / folder
        out.mkdir(exist_ok=True)
        w, h = im.size
        variants = {
            name: im,
            f"{name}_crop": im.crop((w // 10, h // 10, w - w // 8, h - h // 8)),
            f"{name}_mirror": ImageEnhance.Color(ImageOps.mirror(im)).enhance(1.4),
            f"{name}_rotated": im.rotate(12, resample=Image.BICUBIC, expand=False, fillcolor=(128, 128, 128)),
        }
        for stem, picture in variants.items():
            picture.save(out / f"{stem}.jpg", quality=88, optimize=True)


if __name__ == "__main__":
    main()
