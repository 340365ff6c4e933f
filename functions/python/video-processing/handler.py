"""video-processing: decodes a short video shipped in the image with OpenCV,
converts every frame to grayscale, finds its edges (Canny) and re-encodes
the frames as JPEG: 24 frames of 160x120 by default, 48 of 320x240 for
"record", 36 of 240x180 for "replay". The reply carries the frame count and
a digest of the processed frames."""

import hashlib
import os

import cv2

_paths = {}


def init(data_dir):
    cv2.setNumThreads(1)
    for s in (0, 1, 2):
        _paths[s] = os.path.join(data_dir, f"input{s}.avi")
        if not os.path.exists(_paths[s]):
            raise FileNotFoundError(_paths[s])


def handle(name, input_set):
    cap = cv2.VideoCapture(_paths[input_set])
    h = hashlib.sha256()
    frames = encoded = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        edges = cv2.Canny(gray, 50, 150)
        h.update(edges.tobytes())
        ok, jpg = cv2.imencode(".jpg", edges)
        encoded += len(jpg)
        frames += 1
    cap.release()
    return f"video-processing: set={input_set} {frames} frames, {encoded} JPEG bytes, edges sha256={h.hexdigest()[:16]}"
