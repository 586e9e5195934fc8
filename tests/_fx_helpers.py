"""Small models and the digits task shared by the activation-quantization tests and benchmark."""

from __future__ import annotations

import time

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv-bn-relu ×2, max-pool, linear: 1×8×8 digits → 10 logits."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width * 16, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.flatten(self.pool(x)))


class ResidualNet(nn.Module):
    """A model with a residual add(+relu), functional relu, avg-pool and a final linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.conv(y) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


def digits_data(seed: int = 0):
    """sklearn's 8×8 digits as ``(x_train, y_train, x_test, y_test)``, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n = int(0.75 * len(x))
    return x[:n], y[:n], x[n:], y[n:]


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def train(model, x, y, epochs: int, lr: float = 1e-2, batch: int = 64, quantizer=None, seed: int = 0):
    """Plain Adam training loop; ``quantizer.step()`` after each optimizer step if given."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if quantizer is not None:
                quantizer.step()
    return model


def timed(fn, repeats: int):
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats
