"""The character-level LSTM of rnn-serving and its training text."""

import torch
from torch import nn

NAMES = ("alice amelia anna ava bella chloe clara daisy ella emma eva grace hannah "
         "isla ivy lily lucy mia nora olivia ruby sophia zoe adam alex arthur ben "
         "charlie daniel david ethan felix finn george harry henry isaac jack james "
         "leo liam lucas max noah oliver oscar sam theo thomas william").split()
CHARS = "^$abcdefghijklmnopqrstuvwxyz"  # ^ start, $ end
IDX = {c: i for i, c in enumerate(CHARS)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(len(CHARS), 16)
        self.lstm = nn.LSTM(16, 64, batch_first=True)
        self.out = nn.Linear(64, len(CHARS))

    def forward(self, x, state=None):
        h, state = self.lstm(self.emb(x), state)
        return self.out(h), state


def generate(net, prefix, max_len=12):
    """Greedy completion of prefix until the end mark."""
    x = torch.tensor([[IDX["^"]] + [IDX[c] for c in prefix]])
    out, state = net(x)
    s = prefix
    for _ in range(max_len):
        c = int(out[0, -1].argmax())
        if CHARS[c] in "^$":
            break
        s += CHARS[c]
        out, state = net(torch.tensor([[c]]), state)
    return s
