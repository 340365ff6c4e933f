"""The CNN of cnn-serving and its synthetic data."""

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 4)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def batch(gen, n):
    """n noisy 3x32x32 images, each with a bright square in quadrant y."""
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.rand((n, 3, 32, 32), generator=gen) * 0.3
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, :, r * 16 + 4:r * 16 + 12, c * 16 + 4:c * 16 + 12] += 0.7
    return x, y
