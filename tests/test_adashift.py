"""AdaShift against an independent float64 transcription of the paper, and the torch.optim contract.

The reference below is written from Algorithm 2 (Appendix B) and Eq. 44 (Appendix I.4)
directly: it keeps *every* gradient in a Python list and recomputes m_t and v_t from
their definitions -- no ring buffer, no running sum -- so it shares no code or
shortcut with the optimizer.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from adashift_pl.optim import AdaShift, AdaShiftSpatial, build_optimizer, list_optimizers


def phi_ref(x: np.ndarray, op: str, block: str) -> np.ndarray:
    if op == "none":
        return x
    f = np.max if op == "max" else np.mean
    if block == "row" and x.ndim >= 2:
        return f(x.reshape(x.shape[0], -1), axis=1).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return np.asarray(f(x))


class ReferenceAdaShift:
    """Algorithm 2 + Eq. 44 for one parameter, float64, from the paper's text."""

    def __init__(self, theta, lr, beta1, beta2, n, m, op, block="tensor", eps=1e-10, wd=0.0):
        self.theta = np.array(theta, dtype=np.float64)
        self.lr, self.b1, self.b2, self.n, self.m, self.op, self.block, self.eps, self.wd = (
            lr, beta1, beta2, n, m, op, block, eps, wd)
        self.grads: list[np.ndarray] = []
        self.v = np.zeros(())
        self.p = 1.0  # p_t = beta2^k (Algorithm 2, line 11)
        self.updates = 0

    def step(self, g):
        self.grads.append(np.array(g, dtype=np.float64))
        t = len(self.grads)
        if t <= self.n:  # Algorithm 2, lines 5-6: only push
            return
        g_shift = self.grads[t - 1 - self.n]  # g_{t-n}
        weights = [self.b1 ** i for i in range(self.m)]  # Eq. 44; 0**0 == 1
        m_t = sum(w * self.grads[t - 1 - i] for i, w in enumerate(weights)) / sum(weights)
        self.v = self.b2 * self.v + (1 - self.b2) * phi_ref(g_shift ** 2, self.op, self.block)
        self.p *= self.b2
        self.updates += 1
        self.theta = self.theta * (1 - self.lr * self.wd)
        self.theta = self.theta - self.lr / (np.sqrt(self.v / (1 - self.p)) + self.eps) * m_t


def grad_fn(theta: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """A gradient that depends on the parameters (a noisy quadratic with a sin term)."""
    return 0.5 * theta + np.sin(theta * (t % 7 + 1)) + rng.standard_normal(theta.shape)


SHAPES = [(5,), (3, 4), (2, 3, 3, 3), ()]
CONFIGS = [  # (n, m, beta1, beta2, spatial_op, spatial_block)
    (1, None, 0.0, 0.999, "max", "tensor"),
    (10, None, 0.9, 0.999, "max", "tensor"),
    (10, 3, 0.9, 0.99, "max", "tensor"),
    (5, 5, 1.0, 0.9, "mean", "tensor"),
    (4, 2, 0.0, 0.999, "none", "tensor"),
    (3, 1, 0.5, 0.9, "none", "tensor"),
    (6, 4, 1.0, 0.999, "max", "row"),
    (2, None, 0.7, 0.95, "mean", "row"),
]


@pytest.mark.parametrize("n,m,beta1,beta2,op,block", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(shape, n, m, beta1, beta2, op, block):
    rng = np.random.default_rng(0)
    theta0 = rng.standard_normal(shape)
    ref = ReferenceAdaShift(theta0, lr=0.05, beta1=beta1, beta2=beta2, n=n, m=m or n, op=op, block=block, wd=0.01)
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = AdaShift([p], lr=0.05, betas=(beta1, beta2), keep_num=n, window=m, spatial_op=op, spatial_block=block,
                   weight_decay=0.01)
    grng = np.random.default_rng(1)
    for t in range(1, 71):
        g = grad_fn(ref.theta, t, grng)
        p.grad = torch.tensor(g)
        opt.step()
        ref.step(g)
        np.testing.assert_allclose(p.detach().numpy(), ref.theta, rtol=1e-9, atol=1e-12)
    assert ref.updates == 70 - n
    assert not np.allclose(ref.theta, theta0)


def test_running_sum_resync_keeps_float32_close_to_float64():
    """Past the periodic exact recompute of the window sum, float32 stays on the float64 path."""
    rng = np.random.default_rng(3)
    theta0 = rng.standard_normal(50)
    p32 = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float32))
    p64 = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    kw = dict(lr=1e-3, betas=(1.0, 0.999), keep_num=10, window=7)
    o32, o64 = AdaShift([p32], **kw), AdaShift([p64], **kw)
    for t in range(1100):
        g = rng.standard_normal(50) * 3 + 1
        p32.grad, p64.grad = torch.tensor(g, dtype=torch.float32), torch.tensor(g)
        o32.step()
        o64.step()
    s32, s64 = o32.state[p32]["exp_avg_sum"].double(), o64.state[p64]["exp_avg_sum"]
    assert torch.allclose(s32, s64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p32.detach().double().numpy(), p64.detach().numpy(), rtol=1e-4, atol=1e-5)


# --- impulse responses: which gradient goes where ---------------------------------------------


def impulse_run(n, m, beta1, op, steps=None, eps=0.0):
    """Feed e_k (gradient k is 1 at step k only, 0 elsewhere) into a vector parameter.

    Coordinate j receives a gradient only at step j, so the change of coordinate j
    at step t is exactly lr * (weight of g_j in m_t) / sqrt(v_hat). With phi = max
    every phi(g^2) is 1, so v_hat = 1 exactly and the change *is* the weight.
    """
    steps = steps or n + m + 6
    p = torch.nn.Parameter(torch.zeros(steps, dtype=torch.float64))
    opt = AdaShift([p], lr=1.0, betas=(beta1, 0.5), keep_num=n, window=m, spatial_op=op, eps=eps)
    deltas, vs = [], []
    for t in range(1, steps + 1):
        g = torch.zeros(steps, dtype=torch.float64)
        g[t - 1] = 1.0
        p.grad = g
        before = p.detach().clone()
        opt.step()
        deltas.append((p.detach() - before).clone())
        vs.append(opt.state[p]["exp_avg_sq"].clone())
    return deltas, vs


@pytest.mark.parametrize("n,m,beta1", [(1, 1, 0.0), (3, 3, 0.9), (5, 2, 0.5), (4, 4, 1.0), (10, 10, 0.9),
                                       (10, 1, 0.9), (6, 3, 0.0)])
def test_impulse_first_moment_weights_exact(n, m, beta1):
    deltas, vs = impulse_run(n, m, beta1, "max")
    weights = np.array([beta1 ** i for i in range(m)])
    weights /= weights.sum()
    for t, d in enumerate(deltas, start=1):
        if t <= n:  # nothing moves while the queue fills; the first move is at t = n + 1
            assert torch.count_nonzero(d) == 0, f"moved at step {t} <= n={n}"
            continue
        assert torch.count_nonzero(d) > 0, f"did not move at step {t} > n={n}"
        for j, dj in enumerate((-d).tolist()):
            i = t - 1 - j  # gradient j+1 is i steps old at step t
            expected = weights[i] if 0 <= i < m else 0.0
            assert dj == pytest.approx(expected, abs=1e-12), f"step {t}: weight of g_{j + 1} in m_t"


@pytest.mark.parametrize("n,m", [(1, 1), (3, 3), (5, 2), (10, 10)])
def test_impulse_v_takes_exactly_g_t_minus_n(n, m):
    deltas, vs = impulse_run(n, m, 0.9, "none", eps=1.0)
    for t, v in enumerate(vs, start=1):
        seen = torch.nonzero(v).flatten().add(1).tolist()  # gradients that ever entered v
        assert seen == list(range(1, t - n + 1)), f"step {t}: v holds gradients {seen}"
        if t > n:  # the newest entry carries weight (1 - beta2) exactly
            assert v[t - n - 1].item() == pytest.approx(0.5)


def test_impulse_v_never_sees_a_gradient_inside_the_window():
    """With phi = max the scalar v must stay 0 until g_1 leaves: the first update sees only g_{t-n}."""
    n = 4
    p = torch.nn.Parameter(torch.zeros(()))
    opt = AdaShift([p], lr=1.0, betas=(0.0, 0.5), keep_num=n, spatial_op="max")
    for t in range(1, n + 3):
        p.grad = torch.tensor(float(t))  # gradient t has size t: v tells which one it saw
        opt.step()
        v = opt.state[p]["exp_avg_sq"].item()
        if t <= n:
            assert v == 0.0 and p.item() == 0.0
        elif t == n + 1:
            assert v == pytest.approx(0.5 * 1.0)  # (1-b2) * g_1^2
        else:
            assert v == pytest.approx(0.5 * 0.5 + 0.5 * 4.0)  # then g_2^2 = 4


# --- resume ----------------------------------------------------------------------------------


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 + t)
        x = torch.randn(4, 2, 6, 6, generator=gen)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name,kw", [("adashift", {}), ("adashift", {"window": 3, "spatial_block": "row"}),
                                     ("non-adashift", {"keep_num": 4}), ("adashift-spatial", {})])
@pytest.mark.parametrize("save_at", [2, 10, 25])
def test_resume_bit_identical_with_weights_only_load(name, kw, save_at):
    total = 35
    m1 = _model()
    o1 = build_optimizer(name, m1, **kw)
    _train(m1, o1, total)

    m2 = _model()
    o2 = build_optimizer(name, m2, **kw)
    _train(m2, o2, save_at)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m3 = _model(seed=123)
    m3.load_state_dict(ckpt["model"])
    o3 = build_optimizer(name, m3, **kw)
    o3.load_state_dict(ckpt["opt"])
    _train(m3, o3, total - save_at, start=save_at)
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)


def test_loaded_state_follows_parameter_dtype():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    o = AdaShift([p], keep_num=2)
    for _ in range(3):
        p.grad = torch.randn(3, dtype=torch.float64)
        o.step()
    q = torch.nn.Parameter(p.detach().float())
    o2 = AdaShift([q], keep_num=2)
    o2.load_state_dict(o.state_dict())
    assert o2.state[q]["history"].dtype == torch.float32
    q.grad = torch.randn(3)
    o2.step()
    assert o2.state[q]["step"] == 4


# --- the torch.optim contract -----------------------------------------------------------------


def test_step_with_closure_returns_loss_and_runs_under_grad():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdaShift([p], keep_num=1)

    def closure():
        opt.zero_grad()
        assert torch.is_grad_enabled()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    losses = [opt.step(closure) for _ in range(3)]
    assert losses[0].item() == pytest.approx(3.0)
    assert losses[-1].item() < 3.0


def test_grad_none_skipped_and_param_groups_have_their_own_hyper_parameters():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    c = torch.nn.Parameter(torch.ones(2))
    opt = AdaShift([{"params": [a], "keep_num": 1, "lr": 0.1}, {"params": [b], "keep_num": 3}])
    opt.add_param_group({"params": [c], "spatial_op": "none", "keep_num": 2})
    for _ in range(2):
        a.grad, b.grad, c.grad = torch.ones(2), torch.ones(2), None
        opt.step()
    assert not torch.equal(a, torch.ones(2))  # n=1: moved at step 2
    assert torch.equal(b, torch.ones(2))  # n=3: still filling
    assert torch.equal(c, torch.ones(2)) and len(opt.state[c]) == 0
    assert opt.param_groups[2]["spatial_op"] == "none"
    with pytest.raises(ValueError, match="keep_num"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "keep_num": 0})


def test_works_with_lr_scheduler():
    p = torch.nn.Parameter(torch.ones(4))
    opt = AdaShift([p], lr=1.0, keep_num=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        p.grad = torch.ones(4)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes_and_zero_dim(dtype):
    p = torch.nn.Parameter(torch.tensor(1.0, dtype=dtype))
    w = torch.nn.Parameter(torch.ones(3, 3, dtype=dtype))
    opt = AdaShift([p, w], lr=0.1, keep_num=2)
    for _ in range(4):
        p.grad = torch.tensor(2.0, dtype=dtype)
        w.grad = torch.ones(3, 3, dtype=dtype)
        opt.step()
    assert p.dtype == dtype and p.item() < 1.0
    assert opt.state[w]["exp_avg_sq"].shape == ()


def test_maximize_moves_uphill():
    p = torch.nn.Parameter(torch.zeros(()))
    opt = AdaShift([p], lr=0.1, keep_num=1, maximize=True)
    for _ in range(3):
        p.grad = torch.tensor(1.0)
        opt.step()
    assert p.item() > 0


def test_sparse_gradients_are_rejected():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = AdaShift(emb.parameters(), keep_num=1)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_state_holds_only_tensors_and_numbers():
    p = torch.nn.Parameter(torch.randn(3))
    opt = AdaShift([p], keep_num=2)
    p.grad = torch.randn(3)
    opt.step()
    for v in opt.state_dict()["state"][0].values():
        assert isinstance(v, (torch.Tensor, int, float))


def test_memory_is_window_buffers_plus_one_for_max():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = AdaShift([p], keep_num=10, window=3)
    p.grad = torch.randn(8, 8)
    opt.step()
    st = opt.state[p]
    full = sum(v.numel() for v in st.values() if isinstance(v, torch.Tensor) and v.numel() >= p.numel())
    assert full == (3 + 1) * p.numel()
    assert st["phi_history"].shape == (10,)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "learning rate.*-1.0"),
    (dict(betas=(-0.1, 0.9)), "index 0.*-0.1"),
    (dict(betas=(1.1, 0.9)), "index 0.*1.1"),
    (dict(betas=(0.9, 1.0)), "index 1.*1.0"),
    (dict(betas=(0.9, -0.5)), "index 1"),
    (dict(keep_num=0), "keep_num.*0"),
    (dict(keep_num=2.5), "keep_num.*2.5"),
    (dict(keep_num=3, window=4), "window.*4.*keep_num=3"),
    (dict(window=0), "window.*0"),
    (dict(eps=-1e-8), "epsilon.*-1e-08"),
    (dict(weight_decay=-0.1), "weight_decay.*-0.1"),
    (dict(spatial_op="min"), "spatial_op.*'min'.*max, mean, none"),
    (dict(spatial_block="col"), "spatial_block.*'col'"),
    # wrong types (e.g. a YAML string) are ValueErrors naming the parameter, not TypeErrors from a comparison
    (dict(lr="abc"), "learning rate.*'abc'"),
    (dict(betas=(0.9, "x")), "betas.*'x'"),
    (dict(betas=(True, 0.9)), "betas.*True"),
    (dict(eps="a"), "epsilon.*'a'"),
    (dict(weight_decay=None), "weight_decay.*None"),
    (dict(maximize="yes"), "maximize.*'yes'"),
])
def test_bad_hyper_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaShift([torch.nn.Parameter(torch.ones(1))], **kwargs)


def test_beta1_one_allowed_for_adashift_not_for_spatial_only():
    AdaShift([torch.nn.Parameter(torch.ones(1))], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="index 0.*0 <= beta1 < 1"):
        AdaShiftSpatial([torch.nn.Parameter(torch.ones(1))], betas=(1.0, 0.9))
    AdaShiftSpatial([torch.nn.Parameter(torch.ones(1))], betas=(0.9999999995, 0.9))  # any beta1 < 1


def test_spatial_only_matches_its_definition():
    rng = np.random.default_rng(5)
    theta = rng.standard_normal((3, 4))
    p = torch.nn.Parameter(torch.tensor(theta))
    opt = AdaShiftSpatial([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    m, v = np.zeros_like(theta), 0.0
    for t in range(1, 31):
        g = rng.standard_normal((3, 4))
        p.grad = torch.tensor(g)
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * np.max(g ** 2)
        theta = theta - 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
        np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-10)


# --- the factory ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(list_optimizers()))
def test_every_factory_name_builds_and_steps(name):
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(name, model, weight_decay=0.01) if name != "sgd" else build_optimizer(name, model)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(12):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_factory_defaults_are_the_papers():
    d = list_optimizers()
    assert d["adashift"]["lr"] == 1e-2 and d["adashift"]["keep_num"] == 10 and d["adashift"]["betas"] == (0.9, 0.999)
    assert d["adam"]["lr"] == 1e-3 and d["amsgrad"]["amsgrad"] is True
    assert d["adashift-temporal"]["spatial_op"] == "none"
    assert isinstance(build_optimizer("amsgrad", [torch.nn.Parameter(torch.ones(1))]), torch.optim.Adam)


def test_factory_errors_list_what_is_valid():
    params = [torch.nn.Parameter(torch.ones(1))]
    with pytest.raises(ValueError, match="unknown optimizer 'adamax'.*adashift.*sgd"):
        build_optimizer("adamax", params)
    with pytest.raises(ValueError, match="'sgd' does not take betas.*momentum"):
        build_optimizer("sgd", params, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="does not take spatial_op"):
        build_optimizer("adashift", params, spatial_op="none")  # fixed by the name: use non-adashift


def test_factory_excludes_bias_and_norm_from_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer("adam", model, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_grad_scaler_skipped_step_does_not_advance_history():
    """GradScaler skips optimizer.step() on inf/nan gradients: the history must not move."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdaShift([p], keep_num=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    for bad in (False, True, False):
        opt.zero_grad()
        loss = (p * (float("inf") if bad else 1.0)).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert opt.state[p]["step"] == 2


def test_combinations_cover_required_cases():
    """The reference test must include m < n, beta1 = 0 and beta1 = 1 (issue requirement)."""
    assert any(m is not None and m < n for n, m, *_ in CONFIGS)
    assert {0.0, 1.0} <= {b1 for _, _, b1, *_ in CONFIGS}
    assert {"max", "mean", "none"} <= {op for *_, op, _ in CONFIGS}
    assert len(list(itertools.product(SHAPES, CONFIGS))) >= 24


def test_matches_reference_across_the_periodic_resync():
    """The running sum is recomputed from the history every 1000 steps: still Eq. 44 exactly."""
    rng = np.random.default_rng(7)
    theta0 = rng.standard_normal(4)
    ref = ReferenceAdaShift(theta0, lr=1e-3, beta1=0.9, beta2=0.999, n=6, m=4, op="max")
    p = torch.nn.Parameter(torch.tensor(theta0))
    opt = AdaShift([p], lr=1e-3, betas=(0.9, 0.999), keep_num=6, window=4)
    for t in range(1, 1011):
        g = grad_fn(ref.theta, t, rng)
        p.grad = torch.tensor(g)
        opt.step()
        ref.step(g)
    np.testing.assert_allclose(p.detach().numpy(), ref.theta, rtol=1e-9)
