"""lr-training: trains a sentiment classifier (TF-IDF features + logistic
regression) on the first N reviews of the dataset shipped in the image and
scores it on the rest: N = 1000 by default, 2000 for "record", 4000 for
"replay". The reply carries the held-out accuracy and a digest of the
learned coefficients (rounded, so it is the same on every run)."""

import hashlib
import os

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

SIZES = {0: 1000, 1: 2000, 2: 4000}
_rows = []


def init(data_dir):
    with open(os.path.join(data_dir, "reviews.tsv")) as f:
        for line in f:
            label, text = line.rstrip("\n").split("\t", 1)
            _rows.append((text, int(label)))


def handle(name, input_set):
    n = SIZES[input_set]
    train, test = _rows[:n], _rows[n:n + 1000]
    vec = TfidfVectorizer()
    x = vec.fit_transform([t for t, _ in train])
    model = LogisticRegression(max_iter=500)
    model.fit(x, [y for _, y in train])
    acc = model.score(vec.transform([t for t, _ in test]), [y for _, y in test])
    digest = hashlib.sha256(",".join(f"{c:.3f}" for c in model.coef_[0]).encode()).hexdigest()[:16]
    return f"lr-training: set={input_set} trained on {n} reviews, {x.shape[1]} features, held-out accuracy {acc:.3f}, coef={digest}"
