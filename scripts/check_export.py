#!/usr/bin/env python3
"""Loads a file written by `mlaan-pipe export` into the library model it names — timm's
`VisionTransformer` for a ViT, torchvision's `vgg*_bn` for a VGG (the CIFAR form with its
classifier and last pool replaced), torchvision's `resnet*` for an ImageNet ResNet — with
`load_state_dict(strict=True)`, evaluates it on an IDX test set (MNIST, Fashion-MNIST) and
checks that its accuracy and mean cross-entropy equal those `mlaan-pipe eval --json` reports
for the same weights. A check of the export, not part of `make test`: it needs a full PyTorch
with torchvision and timm, which the project's `.venv` deliberately lacks:

    python3 -m venv /tmp/export-check
    /tmp/export-check/bin/pip install torch==2.11.0 torchvision==0.26.0 timm safetensors
    mlaan-pipe export runs/RUN --out model.safetensors
    mlaan-pipe eval --model runs/RUN --json eval.json
    /tmp/export-check/bin/python scripts/check_export.py model.safetensors --arch vit-tiny-p4 \\
        --classes 10 --data /usr/share/datasets/fashion-mnist --mean 0.2860 --std 0.3530 \\
        --expect eval.json
"""
import argparse
import gzip
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file

VIT_PRESETS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
VGG_STAGES = {11: [1, 1, 2, 2, 2], 13: [2, 2, 2, 2, 2], 16: [2, 2, 3, 3, 3]}


def vit(arch, side, chans, classes):
    from timm.models.vision_transformer import VisionTransformer

    m = re.fullmatch(r"vit-(tiny|small|base)(?:-p(\d+))?", arch)
    if m:
        (d, depth, heads), patch = VIT_PRESETS[m[1]], int(m[2] or 16)
    else:
        d, depth, heads, patch = map(int, re.fullmatch(r"vit-w(\d+)-d(\d+)-h(\d+)-p(\d+)", arch).groups())
    return VisionTransformer(img_size=side, patch_size=patch, in_chans=chans, num_classes=classes,
                             embed_dim=d, depth=depth, num_heads=heads)


def vgg(arch, chans, classes):
    from torchvision.models.vgg import VGG, make_layers

    m = re.fullmatch(r"vgg(11|13|16)(-cifar)?(?:-w(\d+))?", arch)
    w = int(m[3] or 64)
    cfg = []
    for n, width in zip(VGG_STAGES[int(m[1])], [w, 2 * w, 4 * w, 8 * w, 8 * w]):
        cfg += [width] * n + ["M"]
    net = VGG(make_layers(cfg, batch_norm=True), num_classes=classes)
    net.features[0] = nn.Conv2d(chans, w, 3, padding=1)
    if m[2]:
        # The CIFAR form: the last pool over the whole map, one linear classifier.
        net.features[-1] = nn.AdaptiveMaxPool2d(1)
        net.avgpool = nn.Identity()
        net.classifier = nn.Linear(8 * w, classes)
    return net


def resnet(arch, classes):
    import torchvision

    return getattr(torchvision.models, arch)(num_classes=classes)


def idx(path):
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def find(data, stem):
    for name in (stem, stem + ".gz"):
        if (data / name).exists():
            return data / name
    sys.exit(f"{stem}[.gz] not in {data}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--arch", required=True)
    p.add_argument("--classes", type=int, required=True)
    p.add_argument("--data", type=Path, required=True, help="folder of the IDX test files")
    p.add_argument("--mean", type=float, required=True)
    p.add_argument("--std", type=float, required=True)
    p.add_argument("--expect", type=Path, help="`mlaan-pipe eval --json` of the same weights")
    a = p.parse_args()
    images = idx(find(a.data, "t10k-images-idx3-ubyte"))
    labels = torch.from_numpy(idx(find(a.data, "t10k-labels-idx1-ubyte")).astype(np.int64))
    x = (torch.from_numpy(images.copy()).float().unsqueeze(1) / 255 - a.mean) / a.std
    side, chans = x.shape[-1], x.shape[1]
    if a.arch.startswith("vit-"):
        net = vit(a.arch, side, chans, a.classes)
    elif a.arch.startswith("vgg"):
        net = vgg(a.arch, chans, a.classes)
    else:
        net = resnet(a.arch, a.classes)
    net.load_state_dict(load_file(a.model), strict=True)
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(x), 500):
            logits = net(x[i:i + 500])
            y = labels[i:i + 500]
            correct += (logits.argmax(1) == y).sum().item()
            loss += nn.functional.cross_entropy(logits.double(), y, reduction="sum").item()
    acc, loss = correct / len(x), loss / len(x)
    print(f"{a.arch}: loaded with strict=True; test accuracy {acc:.4f}, loss {loss:.4f}")
    if a.expect:
        e = json.loads(a.expect.read_text())
        ok = abs(e["test_accuracy"] - acc) < 1e-9 and abs(e["test_loss"] - loss) < 1e-4
        print(f"mlaan-pipe eval: test accuracy {e['test_accuracy']:.4f}, loss {e['test_loss']:.4f}: "
              f"{'the same' if ok else 'DIFFERENT'}")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
