"""Draw docs/drawing.png: a flat-colour flower like a quick sketch, the input of sketch-to-image.

python docs/make_drawing.py
"""

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw


def draw_flower(size=256):
    img = Image.new("RGB", (size, size), (110, 160, 70))  # a green background, as most Flowers102 photos
    d = ImageDraw.Draw(img)
    s = size / 256
    d.rectangle([0, 0, size, 90 * s], fill=(90, 140, 60))  # darker foliage at the top
    d.line([(128 * s, 150 * s), (120 * s, 256 * s)], fill=(40, 100, 30), width=int(10 * s))  # stem
    d.ellipse([130 * s, 190 * s, 190 * s, 220 * s], fill=(50, 120, 40))  # leaf
    cx, cy, petals = 128 * s, 115 * s, 8
    for k in range(petals):  # petals: ellipses around the center, drawn as polygons
        a = 2 * math.pi * k / petals
        pts = []
        for j in range(24):
            u = 2 * math.pi * j / 24
            x, y = 32 * math.cos(u) * s, 14 * math.sin(u) * s  # one petal, pointing along x
            x += 38 * s
            pts.append((cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)))
        d.polygon(pts, fill=(235, 70, 120))
    d.ellipse([cx - 22 * s, cy - 22 * s, cx + 22 * s, cy + 22 * s], fill=(250, 200, 40))  # center
    return img


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Draw a flat-colour flower, the sketch-to-image example input.")
    p.add_argument("--size", type=int, default=256, help="width and height in pixels")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "drawing.png"))
    args = p.parse_args()
    if args.size < 16:
        p.error(f"--size must be at least 16, got {args.size}")
    draw_flower(args.size).save(args.out)
    print(f"wrote {args.out}")
