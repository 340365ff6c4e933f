"""Build step: render the three short input videos video-processing ships
(a ball bouncing over a gradient, Motion-JPEG in AVI)."""

import os
import sys

import cv2
import numpy as np

SIZES = {0: (160, 120, 24), 1: (320, 240, 48), 2: (240, 180, 36)}  # w, h, frames

for s, (w, h, n) in SIZES.items():
    path = os.path.join(sys.argv[1], f"input{s}.avi")
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 24, (w, h))
    base = np.zeros((h, w, 3), np.uint8)
    base[:, :, 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    base[:, :, 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    for i in range(n):
        frame = base.copy()
        x = int((w - 20) * abs(((i * 7) % (2 * n)) / n - 1))
        y = int((h - 20) * abs(((i * 5) % (2 * n)) / n - 1))
        cv2.circle(frame, (x + 10, y + 10), 10, (255, 255, 255), -1)
        cv2.putText(frame, f"{s}:{i}", (4, h - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 255), 1)
        out.write(frame)
    out.release()
