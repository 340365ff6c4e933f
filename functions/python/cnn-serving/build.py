"""Build step: train the small convolutional network cnn-serving loads at
start-up, on synthetic 32x32 images of four classes (a bright square in one
of the four quadrants), and save its weights."""

import os
import sys

import torch

import model

torch.manual_seed(0)
torch.set_num_threads(1)
net = model.Net()
opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
for step in range(150):
    x, y = model.batch(torch.Generator().manual_seed(step), 64)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
torch.save(net.state_dict(), os.path.join(sys.argv[1], "model.pt"))
print(f"trained, last loss {loss.item():.4f}")
