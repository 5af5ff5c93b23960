"""One epoch of augmented CIFAR-shaped training batches: torchvision's per-image pipeline against resident tensors.

The images are random uint8 ``3 x 32 x 32`` arrays (``--images`` of them; no files are read). Each pipeline
delivers every batch of one shuffled epoch (``--batch-size``) on ``--device`` with the papers' augmentation
(random crop with 4 pixels of zero padding, horizontal flip, then normalisation):

* **torchvision, DataLoader**: what the harness ran before session 10, and what most SAM repositories run: a
  dataset that makes a PIL image of each array and applies ``Compose([RandomCrop(32, padding=4),
  RandomHorizontalFlip(), ToTensor(), Normalize(...)])``, batched by a ``DataLoader`` with ``--workers`` worker
  processes (0: in the main process; on CUDA with ``pin_memory``), then copied to the device;
* **resident (ours)**: :class:`sharpness.data.images.ImageTensors` on the device, walked by
  :func:`sharpness.data.resident.resident_batches` (one permutation and one draw per epoch on the host, two gathers
  and the normalisation per batch on the device).

No model runs: this is the data's own cost per epoch, the part of an epoch a GPU waits for when it is too slow.
After ``--warmup`` untimed epochs, each of ``--repeats`` rounds times one epoch per pipeline, in an order that
alternates between rounds; on CUDA the epoch ends with ``torch.cuda.synchronize``. Reported: the median and IQR
of the wall time per epoch, microseconds per image, and the ratio of the medians (torchvision / ours).

Usage::

    python benchmarks/bench_data.py                                   # about 1 minute, 1 CPU thread
    python benchmarks/bench_data.py --workers 0 2 --json benchmarks/results/data-cpu.json
    python benchmarks/bench_data.py --device cuda --workers 0 8 --json benchmarks/results/data-cuda.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _shared import environment, quartiles, write_json_atomically
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sharpness.data.images import ImageTensors
from sharpness.data.resident import resident_batches

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's


class PilImages(Dataset):
    """Item ``i``: the PIL image of ``images[i]`` (``H x W x C`` uint8) through ``transform``, and its label."""

    def __init__(self, images_hwc: Any, labels: Tensor, transform: Callable[[Any], Tensor]) -> None:
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def torchvision_epoch(dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                      seed: int) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    def epoch() -> Iterator[tuple[Tensor, Tensor]]:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda",
                            persistent_workers=False)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return epoch


def resident_epoch(data: ImageTensors, batch_size: int, seed: int) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    return lambda: resident_batches(data, batch_size, order=generator, augment=generator)


def time_epoch(epoch: Callable[[], Iterator[tuple[Tensor, Tensor]]], device: torch.device) -> tuple[float, int]:
    """Wall seconds to walk one epoch (on CUDA until the device is idle) and the images delivered."""
    count = 0
    start = time.perf_counter()
    for _, y in epoch():
        count += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, count


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="DataLoader worker counts to time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here (atomically)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--images, --batch-size and --repeats must be >= 1, --warmup >= 0")
    if any(w < 0 for w in args.workers):
        parser.error("--workers must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from torchvision import transforms as T

    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.images,), generator=generator)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    pil = PilImages(images.permute(0, 2, 3, 1).contiguous().numpy(), labels, transform)
    resident = ImageTensors(images, labels, mean=MEAN, std=STD, padding=4, flip=True).to(device)
    pipelines = {f"torchvision, DataLoader workers={w}": torchvision_epoch(pil, args.batch_size, w, device, args.seed)
                 for w in args.workers}
    pipelines["resident (ours)"] = resident_epoch(resident, args.batch_size, args.seed)

    for _ in range(args.warmup):
        for epoch in pipelines.values():
            time_epoch(epoch, device)
    samples: dict[str, list[float]] = {name: [] for name in pipelines}
    names = list(pipelines)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                seconds, count = time_epoch(pipelines[name], device)
                if count != args.images:
                    raise RuntimeError(f"{name} delivered {count} images, expected {args.images}")
                samples[name].append(seconds)
    finally:
        if gc_was_enabled:
            gc.enable()

    ours = statistics.median(samples["resident (ours)"])
    rows = {}
    print(f"{args.images} images 3x32x32, batch {args.batch_size}, crop(4)+flip+normalise, on {device} "
          f"({torch.get_num_threads()} torch threads), {args.repeats} epochs each")
    print(f"{'pipeline':<36} {'s/epoch':>9} {'IQR':>8} {'us/image':>9} {'x ours':>8}")
    for name, values in samples.items():
        q1, median, q3 = quartiles(values)
        rows[name] = {"median_s": median, "q1_s": q1, "q3_s": q3, "us_per_image": 1e6 * median / args.images,
                      "ratio_to_ours": median / ours, "per_epoch_s": values}
        print(f"{name:<36} {median:9.3f} {q3 - q1:8.3f} {1e6 * median / args.images:9.1f} {median / ours:8.1f}")
    payload = {"environment": environment(packages=("torchvision", "pillow"), extra={"device": str(device)},
                                          options=vars(args)),
               "results": rows}
    if args.json:
        write_json_atomically(args.json, payload)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
