"""Synthetic product reviews: positive and negative sentiment words mixed
with neutral filler, from a seeded generator (the same text on every run)."""

import random

POSITIVE = ("good great excellent love loved amazing perfect happy wonderful best "
            "recommend fast sturdy beautiful comfortable reliable pleasant nice fantastic").split()
NEGATIVE = ("bad poor terrible hate hated awful broken slow worst refund disappointed "
            "cheap flimsy ugly useless noisy returned waste horrible annoying").split()
NEUTRAL = ("the a it this product item box delivery price color size battery screen "
           "was is and but with for after week day order seller shipping").split()


def review(rng, positive):
    words = []
    for _ in range(rng.randint(8, 24)):
        r = rng.random()
        if r < 0.25:
            words.append(rng.choice(POSITIVE if positive else NEGATIVE))
        elif r < 0.32:
            words.append(rng.choice(NEGATIVE if positive else POSITIVE))
        else:
            words.append(rng.choice(NEUTRAL))
    return " ".join(words)


def dataset(seed, n):
    """n (text, label) pairs; label 1 is positive."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        out.append((review(rng, label == 1), label))
    return out
