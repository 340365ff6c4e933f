"""lr-serving: sentiment analysis of product reviews with a logistic
regression model over TF-IDF features. The model (trained at image build
time by build.py) is loaded at start-up; each request classifies one batch
of reviews: 10 by default, 200 for "record", 500 for "replay"."""

import hashlib
import os
import pickle

import reviews

BATCHES = {0: (100, 10), 1: (101, 200), 2: (102, 500)}
_model = None
_inputs = {}


def init(data_dir):
    global _model
    with open(os.path.join(data_dir, "model.pkl"), "rb") as f:
        _model = pickle.load(f)
    for s, (seed, n) in BATCHES.items():
        _inputs[s] = [t for t, _ in reviews.dataset(seed, n)]


def handle(name, input_set):
    texts = _inputs[input_set]
    x = _model["vectorizer"].transform(texts)
    proba = _model["model"].predict_proba(x)[:, 1]
    positive = int((proba >= 0.5).sum())
    digest = hashlib.sha256(",".join(f"{p:.4f}" for p in proba).encode()).hexdigest()[:16]
    return f"lr-serving: set={input_set} reviews={len(texts)} positive={positive} negative={len(texts) - positive} scores={digest}"
