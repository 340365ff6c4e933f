"""Build step: draw the three input images image-rotate ships (JPEG)."""

import os
import sys

from PIL import Image, ImageDraw

SIZES = {0: (320, 240), 1: (1024, 768), 2: (640, 480)}

for s, (w, h) in SIZES.items():
    img = Image.new("RGB", (w, h))
    px = img.load()
    for y in range(h):
        for x in range(w):
            px[x, y] = ((x * 255) // w, (y * 255) // h, ((x + y) * 7) % 256)
    d = ImageDraw.Draw(img)
    for i in range(12):
        x0, y0 = (i * 97 + s * 31) % w, (i * 61 + s * 17) % h
        d.ellipse([x0, y0, x0 + w // 6, y0 + h // 6], outline=(255, 255, 255), width=3)
        d.rectangle([w - x0 - w // 8, y0, w - x0, y0 + h // 10], fill=(i * 20 % 256, 40, 200))
    d.text((10, 10), f"vhive input set {s}", fill=(255, 255, 0))
    img.save(os.path.join(sys.argv[1], f"input{s}.jpg"), quality=90)
