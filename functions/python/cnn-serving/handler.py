"""cnn-serving: image classification with a small convolutional network
(PyTorch). The weights, trained at image build time, are loaded at
start-up; each request classifies a batch of synthetic images: 8 by
default, 64 for "record", 32 for "replay"."""

import os

import torch

import model

BATCHES = {0: (1000, 8), 1: (1001, 64), 2: (1002, 32)}
_net = None


def init(data_dir):
    global _net
    torch.set_num_threads(1)
    _net = model.Net()
    _net.load_state_dict(torch.load(os.path.join(data_dir, "model.pt")))
    _net.eval()


def handle(name, input_set):
    seed, n = BATCHES[input_set]
    x, y = model.batch(torch.Generator().manual_seed(seed), n)
    with torch.no_grad():
        pred = _net(x).argmax(1)
    counts = [int((pred == c).sum()) for c in range(4)]
    correct = int((pred == y).sum())
    return f"cnn-serving: set={input_set} classified {n} images, per class {counts}, {correct}/{n} correct"
