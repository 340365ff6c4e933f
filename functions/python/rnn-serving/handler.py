"""rnn-serving: text generation with a character-level LSTM (PyTorch),
trained at image build time on a list of names and loaded at start-up; each
request completes a set of prefixes greedily: 4 by default, 26 (a–z) for
"record", 12 two-letter prefixes for "replay"."""

import os

import torch

import model

PREFIXES = {0: ["a", "e", "l", "s"], 1: list("abcdefghijklmnopqrstuvwxyz"),
            2: ["al", "be", "ch", "da", "em", "ge", "ha", "ja", "li", "ma", "ol", "th"]}
_net = None


def init(data_dir):
    global _net
    torch.set_num_threads(1)
    _net = model.Net()
    _net.load_state_dict(torch.load(os.path.join(data_dir, "model.pt")))
    _net.eval()


def handle(name, input_set):
    with torch.no_grad():
        names = [model.generate(_net, p) for p in PREFIXES[input_set]]
    return f"rnn-serving: set={input_set} " + " ".join(names)
