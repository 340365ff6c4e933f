"""Build step: generate the three JSON documents json-serdes ships
(nested records from a seeded generator)."""

import json
import os
import random
import sys

SIZES = {0: 50, 1: 800, 2: 3000}
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def record(rng, i):
    return {
        "id": i,
        "name": " ".join(rng.choice(WORDS) for _ in range(3)),
        "score": round(rng.random() * 100, 3),
        "active": rng.random() < 0.5,
        "tags": [rng.choice(WORDS) for _ in range(rng.randint(0, 5))],
        "address": {"street": f"{rng.randint(1, 999)} {rng.choice(WORDS)} st", "zip": f"{rng.randint(10000, 99999)}"},
        "history": [{"t": rng.randint(0, 10**9), "v": rng.random()} for _ in range(rng.randint(1, 4))],
    }


for s, n in SIZES.items():
    rng = random.Random(s + 1000)
    doc = {"set": s, "records": [record(rng, i) for i in range(n)]}
    with open(os.path.join(sys.argv[1], f"input{s}.json"), "w") as f:
        json.dump(doc, f)
