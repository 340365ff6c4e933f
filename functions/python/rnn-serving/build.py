"""Build step: train rnn-serving's character-level LSTM on a list of names
and save its weights."""

import os
import sys

import torch

import model

torch.manual_seed(0)
torch.set_num_threads(1)
net = model.Net()
opt = torch.optim.Adam(net.parameters(), lr=0.01)
seqs = [[model.IDX[c] for c in "^" + n + "$"] for n in model.NAMES]
for epoch in range(60):
    total = 0.0
    for s in seqs:
        x, y = torch.tensor([s[:-1]]), torch.tensor(s[1:])
        opt.zero_grad()
        out, _ = net(x)
        loss = torch.nn.functional.cross_entropy(out[0], y)
        loss.backward()
        opt.step()
        total += loss.item()
torch.save(net.state_dict(), os.path.join(sys.argv[1], "model.pt"))
print(f"trained, mean loss {total / len(seqs):.4f}")
