"""image-rotate: decodes a JPEG shipped in the image and rotates it by 90,
180 and 270 degrees with Pillow, re-encoding each result as JPEG: a 320x240
image by default, 1024x768 for "record", 640x480 for "replay". The reply
carries the sizes and a digest of the rotated pixels."""

import hashlib
import io
import os

from PIL import Image

_inputs = {}


def init(data_dir):
    for s in (0, 1, 2):
        with open(os.path.join(data_dir, f"input{s}.jpg"), "rb") as f:
            _inputs[s] = f.read()


def handle(name, input_set):
    img = Image.open(io.BytesIO(_inputs[input_set]))
    img.load()
    h = hashlib.sha256()
    encoded = 0
    for angle in (90, 180, 270):
        r = img.rotate(angle, expand=True)
        h.update(r.tobytes())
        buf = io.BytesIO()
        r.save(buf, format="JPEG", quality=85)
        encoded += buf.tell()
    w, hgt = img.size
    return f"image-rotate: set={input_set} rotated {w}x{hgt} by 90/180/270, {encoded} JPEG bytes, pixels sha256={h.hexdigest()[:16]}"
