#!/usr/bin/env python3
"""The end-to-end ResNet step in plain PyTorch, to set beside `mlaan-pipe bench --cases e2e`
on the same shapes, threads and batch (docs/benchmarks.md). A benchmark reference, not part
of the product or of `make test`: it needs a full PyTorch (the `torch` package with its CUDA
runtime wheels, which the project's `.venv` deliberately lacks), installed in a throwaway venv:

    python3 -m venv /tmp/torch-ref && /tmp/torch-ref/bin/pip install torch==2.11.0
    /tmp/torch-ref/bin/python scripts/pytorch_reference.py --threads 2

The network is the CIFAR ResNet the project builds (3x3 stem, three stages of BasicBlocks at
16/32/64 channels, 1x1 projection shortcuts where the shape changes, global average pool, fc),
trained with SGD (Nesterov momentum 0.9, weight decay 1e-4) on pre-made batches of raw u8
images normalised on the fly, as the bench feeds the pipeline: no data loading is timed.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride, inplace):
        super().__init__()
        # ReLU in place and the residual sum into the block's output, as torchvision writes
        # it (and as the project does); out of place allocates a new tensor for each.
        self.inplace = inplace
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=self.inplace)
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        y = y.add_(shortcut) if self.inplace else y + shortcut
        return F.relu(y, inplace=self.inplace)


class CifarResNet(nn.Module):
    def __init__(self, depth, in_channels, classes, inplace):
        super().__init__()
        self.inplace = inplace
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for stage, width in enumerate([16, 32, 64]):
            for i in range(n):
                layers.append(Block(cin, width, 2 if stage > 0 and i == 0 else 1, inplace))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=self.inplace)
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-of-place", action="store_true", help="ReLU and residual sum out of place")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    net = CifarResNet(a.depth, a.channels, a.classes, inplace=not a.out_of_place)
    opt = torch.optim.SGD(
        net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    shape = (a.batch, a.channels, a.size, a.size)
    batches = [
        (torch.randint(0, 256, shape, dtype=torch.uint8), torch.randint(0, a.classes, (a.batch,)))
        for _ in range(8)
    ]
    mean, std = 0.2860, 0.3530  # Fashion-MNIST's, as the project normalises it

    def step(i):
        x, y = batches[i % len(batches)]
        x = (x.float() / 255.0 - mean) / std
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    net.train()
    rates = []
    for r in range(a.repeats):
        for i in range(a.warmup):
            step(i)
        t = time.perf_counter()
        for i in range(a.steps):
            step(i)
        rates.append(a.steps * a.batch / (time.perf_counter() - t))
        print(f"rep {r + 1}/{a.repeats}  pytorch e2e resnet{a.depth}  {rates[-1]:8.1f} images/s")
    print(
        f"pytorch {torch.__version__} e2e resnet{a.depth}, batch {a.batch}, {a.threads} threads, "
        f"{'out of place' if a.out_of_place else 'in place'}: "
        f"median {statistics.median(rates):.1f} images/s ({min(rates):.1f}-{max(rates):.1f})"
    )


if __name__ == "__main__":
    main()
