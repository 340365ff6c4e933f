"""Build step: train the sentiment model lr-serving loads at start-up
(TF-IDF features + logistic regression on 4000 synthetic reviews)."""

import os
import pickle
import sys

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

import reviews

out = sys.argv[1]
data = reviews.dataset(seed=7, n=4000)
vec = TfidfVectorizer()
x = vec.fit_transform([t for t, _ in data])
model = LogisticRegression(max_iter=500)
model.fit(x, [y for _, y in data])
with open(os.path.join(out, "model.pkl"), "wb") as f:
    pickle.dump({"vectorizer": vec, "model": model}, f, protocol=4)
print(f"trained on {len(data)} reviews, {x.shape[1]} features, train accuracy {model.score(x, [y for _, y in data]):.3f}")
