"""Rebuild sample_data/ from the clothing-small photos (CC0).

Run once by the maintainers; the result is committed. Usage::

    python sample_data/make_sample_data.py ../shared/data/clothing-small

Each photo is copied unchanged to ``images/<category>/`` and listed in
``manifest.csv`` with a Chinese product title, the category and a product id.
Titles only name the category (the photos are user snapshots, so colour,
material or brand would be guesses) and vary by a few neutral templates.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
import sys
from pathlib import Path

CATEGORY_ZH = {
    "dress": "连衣裙",
    "hat": "帽子",
    "longsleeve": "长袖上衣",
    "outwear": "外套",
    "pants": "长裤",
    "shirt": "衬衫",
    "shoes": "鞋子",
    "shorts": "短裤",
    "skirt": "半身裙",
    "t-shirt": "T恤",
}

# Neutral second-hand-marketplace titles: nothing the photo might contradict.
TEMPLATES = (
    "{zh}",
    "{zh} 实物拍摄",
    "闲置{zh}转让",
    "二手{zh}",
    "{zh} 个人闲置 实拍图",
    "日常{zh}",
)


def main(src: Path, dst: Path) -> None:
    images = dst / "images"
    if images.exists():
        shutil.rmtree(images)
    rows = []
    for category in sorted(CATEGORY_ZH):
        files = sorted((src / category).glob("*.jpg"))
        (images / category).mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy2(f, images / category / f.name)
            # Stable template choice from the file name, not from list order.
            t = int(hashlib.sha1(f.name.encode()).hexdigest(), 16) % len(TEMPLATES)
            rows.append({
                "image": f"images/{category}/{f.name}",
                "text": TEMPLATES[t].format(zh=CATEGORY_ZH[category]),
                "label": category,
                "product_id": f"{category}-{i:03d}",
            })
    with open(dst / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "text", "label", "product_id"])
        w.writeheader()
        w.writerows(rows)
    shutil.copy2(src / "LICENSE", dst / "LICENSE")
    print(f"{len(rows)} images in {len(CATEGORY_ZH)} categories -> {dst}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent)
