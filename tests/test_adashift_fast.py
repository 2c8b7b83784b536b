"""The fast AdaShift paths (fused C kernel on CPU, torch._foreach_* ops) against the reference path.

The reference is AdaShift(foreach=False): the per-parameter function that
tests/test_adashift.py checks against the paper. Here the fast paths must follow it
step for step, hand over to it where they do not apply (the first n steps, the exact
resync of the running sum) and share its state layout.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from adashift_pl.optim import AdaShift, _fast
from adashift_pl.optim.adashift import _RESYNC_EVERY

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(7,), (3, 5), (2, 3, 3, 3), (), (4, 9000)]  # 36000 elements: the kernel splits it into work units


@pytest.fixture
def no_kernel(monkeypatch):
    """Pretend no C compiler is present."""
    monkeypatch.setattr(_fast, "_lib", None)
    monkeypatch.setattr(_fast, "_lib_tried", True)


def groups_for(params):
    # Four groups, each with other hyper-parameters (every spatial_op and block, m < n, beta1 in {0, 1}).
    a, b, c, d, e = params
    return [
        {"params": [a, b], "keep_num": 3, "window": 2, "spatial_op": "max"},
        {"params": [c], "keep_num": 5, "spatial_op": "mean", "lr": 3e-3, "weight_decay": 0.1, "betas": (0.0, 0.9)},
        {"params": [d], "keep_num": 4, "window": 2, "spatial_op": "none", "maximize": True},
        {"params": [e], "keep_num": 2, "spatial_op": "max", "spatial_block": "row", "betas": (1.0, 0.99),
         "weight_decay": 0.01},
    ]


def make_params(dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype))
            for s in SHAPES]


def feed(params, t, gen):
    """Gradients that depend on the parameters; parameter 1 gets no gradient on some steps."""
    for i, p in enumerate(params):
        if i == 1 and t % 7 in (3, 4):
            p.grad = None  # skipped: its history must not advance
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad = (noise + 0.5 * p.detach().double().cpu()).to(device=p.device, dtype=p.dtype)


def run(dtype, device, foreach, steps, params=None, opt=None, start=0):
    params = params or make_params(dtype, device)
    opt = opt or AdaShift(groups_for(params), lr=1e-2, foreach=foreach)
    for t in range(start, start + steps):
        feed(params, t, torch.Generator().manual_seed(1000 + t))  # step t's gradients, however we got here
        opt.step()
    return params, opt


def rel_err(a, b):
    return max(((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-300)).item()
               for x, y in zip(a, b))


def count_calls(monkeypatch):
    calls = {"kernel": 0, "foreach": 0}
    for name in ("kernel", "foreach"):
        orig = getattr(_fast, f"run_{name}")

        def wrapped(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(_fast, f"run_{name}", wrapped)
    return calls


def fast_modes(device):
    if device == "cpu":
        return ["kernel", "foreach"] if _fast.kernel_available() else ["foreach"]
    return ["foreach"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fast_paths_follow_the_reference(monkeypatch, device, dtype, tol):
    ref, ref_opt = run(dtype, device, False, 200)
    for mode in fast_modes(device):
        with monkeypatch.context() as mp:
            if mode == "foreach":
                mp.setattr(_fast, "_lib", None)
                mp.setattr(_fast, "_lib_tried", True)
            calls = count_calls(mp)
            fast, fast_opt = run(dtype, device, True, 200)
        assert calls[mode] > 190 * 4, f"{mode} path did not run: {calls}"
        assert rel_err(fast, ref) < tol, mode
        for p, q in zip(fast, ref):
            s, r = fast_opt.state[p], ref_opt.state[q]
            assert (s["step"], s["updates"]) == (r["step"], r["updates"])
            for key in ("exp_avg_sq", "exp_avg_sum", "history"):
                assert rel_err([s[key]], [r[key]]) < 10 * tol, (mode, key)
    # the parameter that missed some gradients saw fewer of them
    assert ref_opt.state[ref[1]]["step"] < ref_opt.state[ref[0]]["step"]


def test_auto_uses_the_kernel_on_cpu_when_it_is_built(monkeypatch):
    calls = count_calls(monkeypatch)
    run(torch.float32, "cpu", None, 20)
    assert calls["kernel"] > 0 if _fast.kernel_available() else calls["kernel"] == 0
    assert calls["foreach"] == 0


def test_without_a_compiler_auto_falls_back_and_foreach_true_uses_foreach_ops(monkeypatch, no_kernel):
    calls = count_calls(monkeypatch)
    ref, _ = run(torch.float64, "cpu", False, 40)
    auto, _ = run(torch.float64, "cpu", None, 40)
    assert calls == {"kernel": 0, "foreach": 0}  # CPU foreach ops are no faster: auto keeps the reference
    assert all(torch.equal(a, b) for a, b in zip(auto, ref))
    run(torch.float64, "cpu", True, 40)
    assert calls["foreach"] > 0


def test_bfloat16_fast_path_is_as_accurate_as_the_reference(monkeypatch):
    truth, _ = run(torch.float64, "cpu", False, 60)
    ref, _ = run(torch.bfloat16, "cpu", False, 60)
    for mode in fast_modes("cpu"):
        with monkeypatch.context() as mp:
            if mode == "foreach":
                mp.setattr(_fast, "_lib", None)
                mp.setattr(_fast, "_lib_tried", True)
            fast, _ = run(torch.bfloat16, "cpu", True, 60)
        # bfloat16 rounds every stored value to 8 bits: the paths differ in where they round (the kernel
        # computes in float32 and rounds once per stored value); neither may be further from float64.
        assert rel_err(fast, truth) <= 1.25 * rel_err(ref, truth) + 1e-3, mode
        assert all(p.dtype == torch.bfloat16 for p in fast)
    # One step past the queue: they agree to a bfloat16 rounding.
    a, _ = run(torch.bfloat16, "cpu", False, 6)
    b, _ = run(torch.bfloat16, "cpu", True, 6)
    assert rel_err(b, a) < 1e-2


@pytest.mark.parametrize("save_at", [2, 40])
@pytest.mark.parametrize("direction", ["fast->reference", "reference->fast"])
def test_state_dict_moves_between_paths(save_at, direction):
    first, then = (True, False) if direction == "fast->reference" else (False, True)
    full, _ = run(torch.float64, "cpu", then, 80)  # the path that resumes, uninterrupted
    params, opt = run(torch.float64, "cpu", first, save_at)
    buf = io.BytesIO()
    torch.save({"p": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    params2 = [torch.nn.Parameter(x) for x in ckpt["p"]]
    opt2 = AdaShift(groups_for(params2), lr=1e-2, foreach=then)
    opt2.load_state_dict(ckpt["opt"])
    assert [g["foreach"] for g in opt2.param_groups] == [first] * 4  # saved groups win, as in torch.optim
    for g in opt2.param_groups:
        g["foreach"] = then
    resumed, _ = run(torch.float64, "cpu", then, 80 - save_at, params=params2, opt=opt2, start=save_at)
    # same trajectory up to the float64 rounding differences of the two paths before the save
    assert rel_err(resumed, full) < 1e-12


def test_no_update_within_the_first_n_steps_and_grad_none_skipped():
    p = torch.nn.Parameter(torch.randn(100))
    q = torch.nn.Parameter(torch.randn(100))
    frozen = torch.nn.Parameter(torch.randn(3))
    opt = AdaShift([p, q, frozen], keep_num=5, foreach=True)
    p0, q0 = p.detach().clone(), q.detach().clone()
    for t in range(1, 9):
        p.grad = torch.randn(100)
        q.grad = torch.randn(100) if t != 7 else None
        opt.step()
        if t <= 5:
            assert torch.equal(p, p0) and torch.equal(q, q0)
    assert opt.state[p]["step"] == 8 and opt.state[p]["updates"] == 3
    assert opt.state[q]["step"] == 7 and opt.state[q]["updates"] == 2
    assert frozen not in opt.state


def test_no_step_no_history_advance():
    p = torch.nn.Parameter(torch.randn(50))
    opt = AdaShift([p], keep_num=2, foreach=True)
    for _ in range(5):
        p.grad = torch.randn(50)
        opt.step()
    snap = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
    p.grad = torch.randn(50)  # a backward without step(): nothing moves
    opt.zero_grad()
    for k, v in opt.state[p].items():
        assert torch.equal(v, snap[k]) if torch.is_tensor(v) else v == snap[k]


def test_sparse_gradients_rejected_on_the_fast_path():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = AdaShift(emb.parameters(), keep_num=1, foreach=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_foreach_flag_is_checked():
    with pytest.raises(ValueError, match="foreach"):
        AdaShift([torch.nn.Parameter(torch.zeros(2))], foreach="yes")


def test_kernel_result_does_not_depend_on_thread_count():
    if not _fast.kernel_available():
        pytest.skip("no C compiler")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = run(torch.float32, "cpu", True, 30)
        torch.set_num_threads(2)
        two, _ = run(torch.float32, "cpu", True, 30)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("beta1", [1.0, 0.9])
def test_float32_stays_within_1e5_of_float64_over_10000_steps(beta1):
    """The running window sum is resynced from the history every _RESYNC_EVERY steps; the fast path
    hands those steps to the reference function, so float32 cannot drift (beta1 = 1: a plain sum)."""
    steps = 10_000
    assert steps > 5 * _RESYNC_EVERY
    rng = np.random.default_rng(0)
    theta0 = rng.standard_normal((2, 64))
    p32 = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float32)) for x in theta0]
    p64 = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float64)) for x in theta0]
    kw = dict(lr=1e-3, betas=(beta1, 0.999), keep_num=10, window=7)
    o32, o64 = AdaShift(p32, foreach=True, **kw), AdaShift(p64, foreach=False, **kw)
    grads = torch.tensor(rng.standard_normal((steps, 2, 64)) * 3 + 1)
    for t in range(steps):
        for i in range(2):
            p32[i].grad = grads[t, i].float()
            p64[i].grad = grads[t, i]
        o32.step()
        o64.step()
    err = max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(p32, p64))
    assert err < 1e-5, err
