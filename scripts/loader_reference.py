#!/usr/bin/env python3
"""torchvision's ImageFolder + DataLoader timed beside `mlaan-pipe data bench` on the same
folder, with the same transforms, one worker each and the same batch, alternated run by run
(docs/data.md, "Performance"). A benchmark reference, not part of the product or of
`make test`: it needs torchvision, installed in a throwaway venv.

    python3 -m venv /tmp/tv-bench
    /tmp/tv-bench/bin/pip install torch==2.11.0 torchvision==0.26.0

The test folder is cut from photographs that Debian packages (MATE's nature wallpapers and
the photographs among KDE Plasma's), re-encoded at ImageNet's typical sizes and quality:

    cd /tmp && apt-get download mate-backgrounds plasma-workspace-wallpapers
    for d in mate-backgrounds_*.deb plasma-workspace-wallpapers_*.deb; do
        dpkg-deb -x $d photos
    done
    W=/tmp/photos/usr/share/wallpapers
    /tmp/tv-bench/bin/python scripts/loader_reference.py make-folder --out /tmp/imagenet-like \\
        --photos /tmp/photos/usr/share/backgrounds/mate/nature \\
        $(for p in BytheWater ColdRipple DarkestHour EveningGlow FallenLeaf Grey Kite \\
            OneStandsOut Path summer_1am; do
            echo --photos $W/$p/contents/images/2560x1600.jpg
        done)

Then, on a quiet machine:

    /tmp/tv-bench/bin/python scripts/loader_reference.py bench --folder /tmp/imagenet-like \\
        --mlaan target/release/mlaan-pipe [--previous OTHER_BUILD/mlaan-pipe]

`--previous` times a second build of mlaan-pipe in the same rotation, e.g. the commit before
the libjpeg-turbo decoder (zune-jpeg and a hand-written resize):

    mkdir /tmp/prev-src && git archive 37ede3c | tar -x -C /tmp/prev-src
    (cd /tmp/prev-src && LIBTORCH=$OLDPWD/.libtorch cargo build --release)
    cp /tmp/prev-src/target/release/mlaan-pipe /tmp/prev-mlaan-pipe

Each run reports images/s (wall clock; torchvision's from its first batch on, so its worker's
start-up is not counted) and images per CPU-second of the process doing the work
(torchvision: its one worker process over the timed batches; mlaan-pipe: the whole process).
Both transforms produce 3x224x224 uint8 images (the trainer normalises on the device), so
torchvision ends with PILToTensor; `--normalize` times its usual ToTensor + Normalize instead.
"""
import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import time

# ImageNet's photographs are mostly Flickr downsizes with a 500-pixel longer side; these
# (width, height) shapes and weights follow its most common sizes.
SHAPES = [
    ((500, 375), 40),
    ((500, 333), 20),
    ((375, 500), 12),
    ((333, 500), 6),
    ((500, 500), 5),
    ((500, 400), 5),
    ((400, 300), 4),
    ((640, 480), 4),
    ((800, 600), 2),
    ((1024, 768), 2),
]


def make_folder(args):
    from PIL import Image

    photos = []
    for given in args.photos:
        if os.path.isdir(given):
            photos += sorted(
                os.path.join(given, f)
                for f in os.listdir(given)
                if f.lower().endswith((".jpg", ".jpeg", ".png"))
            )
        else:
            photos.append(given)
    if not photos:
        sys.exit(f"no photographs (.jpg/.png) in {args.photos}")
    rng = random.Random(args.seed)
    sources = [Image.open(p).convert("RGB") for p in photos]
    shapes, weights = zip(*SHAPES)
    for split, per_class in (("train", args.per_class), ("val", args.val_per_class)):
        for c in range(args.classes):
            d = os.path.join(args.out, split, f"class_{c:03d}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                src = rng.choice(sources)
                w, h = rng.choices(shapes, weights)[0]
                # A random window of the photograph with the target's aspect ratio, 35-100%
                # of the largest that fits, downsized with Lanczos (as the photo sites do).
                fit = min(src.width / w, src.height / h)
                s = fit * rng.uniform(0.35, 1.0)
                cw, ch = int(w * s), int(h * s)
                x, y = rng.randint(0, src.width - cw), rng.randint(0, src.height - ch)
                img = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.LANCZOS)
                if rng.random() < args.grey_fraction:
                    img = img.convert("L")
                quality = rng.randint(max(1, args.quality - 5), min(100, args.quality + 5))
                img.save(os.path.join(d, f"img_{i:05d}.JPEG"), quality=quality)
    print(
        f"wrote {args.classes} classes x {args.per_class} train + {args.val_per_class} val "
        f"JPEGs from {len(photos)} photographs to {args.out}"
    )


def process_cpu_seconds(pid):
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def torchvision_run(folder, train, batches, batch, normalize):
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    if normalize:
        tail = [T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    else:
        tail = [T.PILToTensor()]
    if train:
        tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip()] + tail)
    else:
        tf = T.Compose([T.Resize(256), T.CenterCrop(224)] + tail)
    ds = ImageFolder(os.path.join(folder, "train" if train else "val"), transform=tf)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=1, drop_last=True
    )
    if len(loader) < batches + 1:
        sys.exit(f"{ds.root} holds {len(loader)} batches of {batch}; need {batches + 1}")
    it = iter(loader)
    worker = it._workers[0].pid
    next(it)  # the worker is up and has its first batch: start the clock
    start, cpu0 = time.perf_counter(), process_cpu_seconds(worker)
    images = 0
    for _ in range(batches):
        x, _ = next(it)
        images += x.shape[0]
    wall, cpu = time.perf_counter() - start, process_cpu_seconds(worker) - cpu0
    del it
    return images / wall, images / cpu


REPORT = re.compile(r"= (\d+) images/s .*?; [\d.]+ CPU-s = (\d+) images per CPU-second")


def mlaan_run(binary, folder, train, batches, batch):
    cmd = [
        binary, "data", "bench", "--dataset", "imagenet", "--data-dir", folder,
        "--workers", "1", "--batch", str(batch), "--batches", str(batches),
    ] + ([] if train else ["--eval"])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    m = REPORT.search(out)
    if not m:
        sys.exit(f"unexpected output from {' '.join(cmd)}:\n{out}")
    return float(m.group(1)), float(m.group(2))


def bench(args):
    def tv(train):
        return torchvision_run(args.folder, train, args.batches, args.batch, args.normalize)

    def ours(binary):
        return lambda train: mlaan_run(binary, args.folder, train, args.batches, args.batch)

    runners = [("torchvision", tv), ("mlaan-pipe", ours(args.mlaan))]
    if args.previous:
        runners.append(("previous", ours(args.previous)))
    results = {}
    for rep in range(args.reps):
        for train in (True, False):
            # Rotate the order every repetition so no runner always goes first.
            order = runners[rep % len(runners):] + runners[: rep % len(runners)]
            for name, run in order:
                rate, per_cpu = run(train)
                results.setdefault((name, train), []).append((rate, per_cpu))
                kind = "train" if train else "eval"
                print(
                    f"rep {rep + 1}/{args.reps} {kind:5} {name:12} {rate:7.1f} images/s  "
                    f"{per_cpu:7.1f} images/CPU-s",
                    flush=True,
                )
    print()
    prev = ["× previous"] if args.previous else []
    print("| transform | loader | images/s, 1 worker (median, min–max) | images per CPU-second "
          "| × torchvision |" + "".join(f" {p} |" for p in prev))
    print("|---|---|--:|--:|--:|" + "--:|" * len(prev))
    for train in (True, False):
        med = {n: statistics.median(r for r, _ in results[(n, train)]) for n, _ in runners}
        for name, _ in runners:
            rates = [r for r, _ in results[(name, train)]]
            cpus = [c for _, c in results[(name, train)]]
            row = (
                f"| {'train' if train else 'eval'} | {name} | {med[name]:.0f} "
                f"({min(rates):.0f}–{max(rates):.0f}) | {statistics.median(cpus):.0f} "
                f"| {med[name] / med['torchvision']:.2f} |"
            )
            if prev:
                row += f" {med[name] / med['previous']:.2f} |"
            print(row)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-folder", help="cut an ImageNet-like JPEG folder from photographs")
    m.add_argument(
        "--photos", required=True, action="append", help="a photograph or a folder of them (repeat)"
    )
    m.add_argument("--out", required=True)
    m.add_argument("--classes", type=int, default=10)
    m.add_argument("--per-class", type=int, default=200)
    m.add_argument("--val-per-class", type=int, default=150)
    m.add_argument(
        "--quality", type=int, default=90, help="JPEG quality, +-5 per image (at most 100)"
    )
    m.add_argument("--grey-fraction", type=float, default=0.02, help="share saved greyscale")
    m.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bench", help="time torchvision and mlaan-pipe alternately")
    b.add_argument("--folder", required=True)
    b.add_argument("--mlaan", required=True, help="the mlaan-pipe binary")
    b.add_argument("--previous", help="another mlaan-pipe build to time in the same rotation")
    b.add_argument("--batches", type=int, default=40)
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--normalize", action="store_true", help="torchvision: ToTensor + Normalize")
    args = p.parse_args()
    make_folder(args) if args.cmd == "make-folder" else bench(args)


if __name__ == "__main__":
    main()
