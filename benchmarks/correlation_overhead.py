"""Overhead of the MomentCorrelation callback on an MNIST-MLP-sized model on CPU.

    python benchmarks/correlation_overhead.py [--steps 300] [--repeats 5] [--threads 1]

Times forward + backward + optimizer.step of a 784-256-256-10 MLP (batch 128, random data) with
and without the callback's step hook attached, alternating the two in several rounds so that load
from other processes hits both alike, and prints the median time per step, the A/B ratio, and -- less noisy on a
shared machine -- the time spent inside the callback's hook per step, measured directly, over the plain
step time. Settings: the callback's defaults (every parameter tensor tracked, K=256, lags 1,2,5,10, a
sample every 10 steps), and the same with a sample every step for comparison.
Not part of the test suite (timing on shared machines is noisy).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from adashift_pl.callbacks import MomentCorrelation
from adashift_pl.optim import build_optimizer


def time_steps(model, opt, x, y, steps: int) -> float:
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def hook_seconds(cb: MomentCorrelation) -> list[float]:
    """Wrap each tracker's step hook with a timer; returns the list the time accumulates in."""
    spent = [0.0]
    for tr in cb.trackers:
        tr.remove()
        inner = tr._hook

        def timed(opt, args, kwargs, inner=inner):
            t0 = time.perf_counter()
            inner(opt, args, kwargs)
            spent[0] += time.perf_counter() - t0

        tr.handle = tr.optimizer.register_step_post_hook(timed)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per timing round")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (with/without alternate)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 784)
    y = torch.randint(10, (args.batch_size,))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.steps} steps x {args.repeats} rounds")
    print(f"{'optimizer':<12}{'every_n':>8}{'step ms':>9}{'+hook ms':>10}{'A/B ratio':>11}{'in-hook ms':>12}"
          f"{'hook/step':>11}")
    for name, every in (("adam", 10), ("adashift", 10), ("adam", 1)):
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.Linear(256, 256), nn.Linear(256, 10))
        opt = build_optimizer(name, model.parameters())
        names = {p: n for n, p in model.named_parameters()}
        time_steps(model, opt, x, y, 50)  # warm-up (and AdaShift's queue)
        plain, hooked, inside = [], [], []
        for _ in range(args.repeats):
            plain.append(time_steps(model, opt, x, y, args.steps))
            cb = MomentCorrelation(every_n_steps=every)
            cb.attach(opt, names)
            spent = hook_seconds(cb)
            hooked.append(time_steps(model, opt, x, y, args.steps))
            inside.append(spent[0] / args.steps)
            cb.detach()
        a, b, h = statistics.median(plain), statistics.median(hooked), statistics.median(inside)
        print(f"{name:<12}{every:>8}{a * 1e3:>9.3f}{b * 1e3:>10.3f}{b / a:>11.3f}{h * 1e3:>12.3f}{h / a:>10.1%}")


if __name__ == "__main__":
    main()
