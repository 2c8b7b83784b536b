"""Training throughput of the vision tasks: images/s and the time spent waiting for data.

    python benchmarks/vision_throughput.py                       # all five models, CPU, config batch sizes
    python benchmarks/vision_throughput.py --tasks cifar10_resnet18 --device cuda --channels-last --bf16

Each task is built from configs/<task>.yaml (full architecture, the config's
batch size and num_workers, AdaShift with the config's Table 5/6/9 settings)
on its synthetic stand-in, which goes through the same transforms as the real
data (crop/flip/normalise), so the data-wait column is representative of the
in-memory data sets (MNIST, CIFAR-10). Tiny-ImageNet from disk also decodes
JPEGs; its real data wait is larger. A plain loop is timed (no Lightning
overhead): `data wait` is the time blocked in next(loader), `step` the
forward + backward + optimizer step. The first --warmup steps are not timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["mnist_logreg", "mnist_mlp", "cifar10_resnet18", "cifar10_densenet", "tinyimagenet_densenet"]


def measure(task: str, args: argparse.Namespace) -> dict:
    from adashift_pl.optim import build_optimizer
    from adashift_pl.tasks import get_task

    cfg = yaml.safe_load((ROOT / "configs" / f"{task}.yaml").read_text())
    data = {**cfg["data"], "source": "synthetic", "dir": "/nonexistent"}
    if args.batch_size:
        data["batch_size"] = args.batch_size
    if args.num_workers is not None:
        data["num_workers"] = args.num_workers
    steps = args.warmup + args.steps
    # Enough synthetic images for the timed steps without reusing a worker's first batches.
    data["synthetic_sizes"] = [data["batch_size"] * steps, data["batch_size"], data["batch_size"]]
    model = dict(cfg["model"])
    if "channels_last" in model:
        model["channels_last"] = args.channels_last
    module, dm = get_task(task).build(model, data, {"name": "adam"}, 0)
    dm.setup("fit")
    device = torch.device(args.device)
    module.to(device).train()
    optimizer = build_optimizer("adashift", module, **cfg["optimizer"]["adashift"])
    loader = dm.train_dataloader()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    wait = compute = 0.0
    n_images = 0
    it = iter(loader)
    for step in range(steps):
        t0 = time.perf_counter()
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        t1 = time.perf_counter()
        with autocast:
            loss = module.criterion(module(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step >= args.warmup:
            wait, compute, n_images = wait + (t1 - t0), compute + (t2 - t1), n_images + len(y)
    total = wait + compute
    return {"task": task, "batch": data["batch_size"], "workers": data["num_workers"],
            "params": sum(p.numel() for p in module.parameters()), "images_s": n_images / total,
            "step_ms": 1000 * total / args.steps, "wait_ms": 1000 * wait / args.steps,
            "wait_pct": 100 * wait / total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per task")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--num-workers", type=int, default=None, help="default: the config's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, device {args.device}, load average {load:.1f}", flush=True)
    print(f"{'task':<24}{'batch':>6}{'workers':>8}{'params':>12}{'images/s':>10}{'ms/step':>9}"
          f"{'data wait ms':>13}{'wait %':>7}", flush=True)
    for task in args.tasks:
        r = measure(task, args)
        print(f"{r['task']:<24}{r['batch']:>6}{r['workers']:>8}{r['params']:>12,}{r['images_s']:>10.1f}"
              f"{r['step_ms']:>9.0f}{r['wait_ms']:>13.1f}{r['wait_pct']:>7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
