"""Build step: write the training set lr-training reads at start-up
(synthetic reviews, one "label<TAB>text" line each)."""

import os
import sys

import reviews

with open(os.path.join(sys.argv[1], "reviews.tsv"), "w") as f:
    for text, label in reviews.dataset(seed=11, n=6000):
        f.write(f"{label}\t{text}\n")
