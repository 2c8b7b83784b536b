"""Optimizer step time and state memory: AdaShift variants against torch.optim.Adam.

    python benchmarks/optimizer_step.py                       # CPU, 2 threads, ResNet-18 + NMT shapes
    python benchmarks/optimizer_step.py --device cuda         # the same on a GPU
    python benchmarks/optimizer_step.py --sets resnet18 --rounds 7 --steps 10

Parameter sets (shapes only, random values; gradients are fixed random tensors):
  resnet18     torchvision.models.resnet18() (ImageNet head): 62 tensors, 11.69M floats
  nmt          Luong LSTM encoder-decoder (IWSLT'15 En-Vi vocabularies 17191/7709, embed 512,
               hidden 896, 2-layer encoder, 2-layer decoder with input feeding, general attention):
               22 tensors, 48.2M floats
  transformer  nn.Transformer base (d 512, 6+6 layers) + an 8000x512 embedding: 185 tensors, 48.2M

Method: every configuration is built fresh in every round (the state of all of them at once
would not fit in memory for the NMT set), warmed up past its first n steps, then timed for
--steps steps; rounds visit the configurations in turn (interleaved), so a slow phase of a
shared machine hits all of them alike. The table shows the median over rounds of the per-round
median ms/step, the spread (min-max of the round medians), the ratios to fused and to foreach
Adam -- each the median over all timed steps of the ratio to the Adam steps run right before and
after it (see time_config) -- and the bytes of optimizer state (x params: in parameter sizes).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from adashift_pl.optim import AdaShift, AdaShiftSpatial  # noqa: E402
from adashift_pl.optim import _fast  # noqa: E402


def shapes_resnet18() -> list[tuple[int, ...]]:
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet18()
    return [tuple(p.shape) for p in model.parameters()]


def shapes_nmt(vocab_src=17191, vocab_tgt=7709, embed=512, hidden=896) -> list[tuple[int, ...]]:
    with torch.device("meta"):
        mods = [nn.Embedding(vocab_src, embed), nn.Embedding(vocab_tgt, embed),
                nn.LSTM(embed, hidden, 2),                       # encoder
                nn.LSTM(embed + hidden, hidden, 1), nn.LSTM(hidden, hidden, 1),  # decoder, input feeding
                nn.Linear(hidden, hidden, bias=False), nn.Linear(2 * hidden, hidden, bias=False),  # attention
                nn.Linear(hidden, vocab_tgt)]                    # softmax layer
    return [tuple(p.shape) for m in mods for p in m.parameters()]


def shapes_transformer() -> list[tuple[int, ...]]:
    with torch.device("meta"):
        mods = [nn.Transformer(512, 8, 6, 6, 2048), nn.Embedding(8000, 512)]
    return [tuple(p.shape) for m in mods for p in m.parameters()]


SETS = {"resnet18": shapes_resnet18, "nmt": shapes_nmt, "transformer": shapes_transformer}


def configs(ns: list[int]) -> list[tuple[str, str, callable]]:
    """(name, n, factory(params)) for every row of the table."""
    rows = [("adam (foreach)", "", lambda p: torch.optim.Adam(p, foreach=True)),
            ("adam (fused)", "", lambda p: torch.optim.Adam(p, fused=True)),
            ("amsgrad (fused)", "", lambda p: torch.optim.Adam(p, amsgrad=True, fused=True)),
            ("amsgrad (foreach)", "", lambda p: torch.optim.Adam(p, amsgrad=True, foreach=True))]
    for op in ("max", "mean", "none"):
        for n in ns:
            rows.append((f"adashift {op}", str(n), lambda p, op=op, n=n: AdaShift(p, keep_num=n, spatial_op=op)))
    rows.append(("adashift max, m=1", "30", lambda p: AdaShift(p, keep_num=30, window=1)))
    rows.append(("adashift max (row blocks)", "10", lambda p: AdaShift(p, keep_num=10, spatial_block="row")))
    rows.append(("adashift-spatial (max)", "", lambda p: AdaShiftSpatial(p)))
    rows.append(("adashift max: reference path", "10", lambda p: AdaShift(p, keep_num=10, foreach=False)))
    rows.append(("adashift max: foreach ops", "10", "foreach-ops"))
    return rows


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def impl_of(opt) -> str:
    if isinstance(opt, AdaShiftSpatial):
        return "reference"  # no fast path (yet)
    if not isinstance(opt, AdaShift):
        return "torch"
    fe = opt.param_groups[0]["foreach"]
    if fe is False:
        return "reference"
    p = opt.param_groups[0]["params"][0]
    if p.device.type == "cpu" and p.dtype in _fast.KERNEL_DTYPES and _fast.kernel_available():
        return "kernel"
    return "foreach" if (fe or p.device.type == "cuda") else "reference"


def timed_step(opt, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    opt.step()
    sync(device)
    return time.perf_counter() - t0


def time_config(factory, params, device, steps, max_state_bytes, fused, foreach):
    """ms/step of one configuration and its step-by-step paired ratios to the two Adams.

    Every timed step of the configuration sits between a step of fused Adam and a step of
    foreach Adam (persistent, on their own copies of the parameters): a slow phase of a shared
    machine then hits the step and its baselines alike, and the median of the per-step ratios
    is far steadier than a ratio of medians taken minutes apart.
    """
    foreach_ops = factory == "foreach-ops"
    if foreach_ops:  # the fallback used where no C compiler is present (and on CUDA)
        saved = _fast._lib, _fast._lib_tried
        _fast._lib, _fast._lib_tried = None, True
        opt = AdaShift(params, keep_num=10, foreach=True)
    else:
        opt = factory(params)
    try:
        n = opt.param_groups[0].get("keep_num", 0)
        est = estimated_state_bytes(opt, params)
        if est > max_state_bytes:
            return None, est, impl_of(opt)
        for _ in range(n + 2):  # fill the queue: the timed steps are steady-state updates
            opt.step()
        times, r_fused, r_foreach = [], [], []
        for _ in range(steps):
            tf = timed_step(fused, device)
            t = timed_step(opt, device)
            te = timed_step(foreach, device)
            times.append(t)
            r_fused.append(t / tf)
            r_foreach.append(t / te)
        return (statistics.median(times) * 1e3, statistics.median(r_fused), statistics.median(r_foreach)), \
            state_bytes(opt), impl_of(opt)
    finally:
        if foreach_ops:
            _fast._lib, _fast._lib_tried = saved
        del opt
        gc.collect()


def estimated_state_bytes(opt, params) -> int:
    if not isinstance(opt, AdaShift):
        return 0
    g = opt.param_groups[0]
    n, m = g["keep_num"], g["window"] or g["keep_num"]
    bufs = (n if g["spatial_op"] == "none" else m) + 1
    return bufs * sum(p.numel() * p.element_size() for p in params)


def cold_build_seconds() -> float | None:
    """Build the C kernel in a fresh process with an empty cache (what a first run pays)."""
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import time; t=time.perf_counter(); from adashift_pl.optim import _fast; "
                "ok=_fast.kernel_available(); print(ok, _fast.kernel_build_seconds())")
        env = dict(os.environ, ADASHIFT_PL_CACHE=tmp, PYTHONPATH=os.pathsep.join(sys.path))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        try:
            ok, secs = out.stdout.split()
            return float(secs) if ok == "True" else None
        except ValueError:
            return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--sets", default="resnet18,nmt", help=f"comma list of {', '.join(SETS)}")
    ap.add_argument("--ns", default="1,10,30", help="keep_num values for the AdaShift rows")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--only", default="", help="comma list of substrings: run only matching rows (+ the Adams)")
    ap.add_argument("--max-state-gb", type=float, default=8.0, help="skip configurations whose state is larger")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = configs([int(x) for x in args.ns.split(",")])
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        rows = [r for r in rows if r[0].startswith("adam (") or any(k in r[0] for k in keep)]

    t0 = time.perf_counter()
    avail = _fast.kernel_available()
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
          f"threads {torch.get_num_threads()}, dtype {args.dtype}, cpu count {os.cpu_count()}, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"# fused CPU kernel available: {avail}; load/build in this process {time.perf_counter() - t0:.2f} s; "
          f"cold build (empty cache, fresh process): {cold_build_seconds()} s")
    for set_name in args.sets.split(","):
        shapes = SETS[set_name]()
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
        numel = sum(p.numel() for p in params)
        pbytes = numel * params[0].element_size()
        print(f"\n## {set_name}: {len(params)} tensors, {numel / 1e6:.2f}M elements ({pbytes / 2**20:.0f} MiB)")
        copies = []
        for _ in range(2):  # the baselines' own parameters, so that they run beside every configuration
            cp = [nn.Parameter(p.detach().clone()) for p in params]
            for c, p in zip(cp, params):
                c.grad = p.grad.clone()
            copies.append(cp)
        fused = torch.optim.Adam(copies[0], fused=True)
        foreach = torch.optim.Adam(copies[1], foreach=True)
        fused.step()
        foreach.step()
        res = {r[0] + r[1]: [] for r in rows}
        ratio_f = {k: [] for k in res}
        ratio_e = {k: [] for k in res}
        info = {}
        for rnd in range(args.rounds):
            for name, n, factory in rows:
                out, sb, impl = time_config(factory, params, device, args.steps, args.max_state_gb * 2**30,
                                            fused, foreach)
                info[name + n] = (sb, impl, out is None)
                if out is None:
                    continue
                res[name + n].append(out[0])
                ratio_f[name + n].append(out[1])
                ratio_e[name + n].append(out[2])
            print(f"#   round {rnd + 1}/{args.rounds} done, load avg {os.getloadavg()[0]:.1f}", flush=True)
        hdr = (f"| {'optimizer':<30} | {'n':>3} | {'impl':<9} | {'ms/step':>8} | {'min-max':>13} | {'x fused':>7} | "
               f"{'x foreach':>9} | {'state MiB':>9} | {'x params':>8} |")
        print(hdr)
        print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
        for name, n, _ in rows:
            key = name + n
            sb, impl, skipped = info[key]
            if skipped:
                print(f"| {name:<30} | {n:>3} | {impl:<9} | {'skipped: state > --max-state-gb':^46} | "
                      f"{sb / 2**20:>9.0f} | {sb / pbytes:>8.2f} |")
                continue
            ts = res[key]
            print(f"| {name:<30} | {n:>3} | {impl:<9} | {statistics.median(ts):>8.2f} | "
                  f"{min(ts):>6.1f}-{max(ts):<6.1f} | {statistics.median(ratio_f[key]):>7.2f} | "
                  f"{statistics.median(ratio_e[key]):>9.2f} | {sb / 2**20:>9.1f} | {sb / pbytes:>8.2f} |")
        for n in args.ns.split(","):
            a, b = ratio_f.get("adashift max10"), ratio_f.get(f"adashift max{n}")
            if a and b and n != "10":
                print(f"# adashift max: cost of n={n} / cost of n=10 = {statistics.median(b) / statistics.median(a):.3f}"
                      " (ratios to fused Adam)")
        del params, copies, fused, foreach
        gc.collect()


if __name__ == "__main__":
    main()
