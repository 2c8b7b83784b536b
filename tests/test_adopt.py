"""ADOPT against an independent float64 transcription of its equations, the torch.optim contract, the
factory names adopt/adamw, the correlation callback reading both, and every task trained with both.

The reference keeps v, m and theta as numpy float64 arrays and follows the official algorithm
(iShohei220/adopt, src/adopt/adopt.py with the 2024-11-22 clip) written out as equations:
step 0 sets v = g^2 and does not move theta; step k >= 1 normalises by max(sqrt(v), eps), clips to
+-k^(1/4), updates m, then theta, and only then v. It shares no code with the optimizer.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from adashift_pl import train
from adashift_pl.callbacks import MomentCorrelation
from adashift_pl.optim import ADOPT, build_optimizer, list_optimizers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this module runs on one intra-op thread (see tests/conftest.py)."""


class ReferenceADOPT:
    """ADOPT for one parameter, float64, from the equations (no torch)."""

    def __init__(self, theta, lr=1e-3, beta1=0.9, beta2=0.9999, eps=1e-6, clip_exp=0.25, wd=0.0,
                 decouple=False, maximize=False):
        self.theta = np.array(theta, dtype=np.float64)
        self.lr, self.b1, self.b2, self.eps, self.c = lr, beta1, beta2, eps, clip_exp
        self.wd, self.decouple, self.maximize = wd, decouple, maximize
        self.m = np.zeros_like(self.theta)
        self.v = np.zeros_like(self.theta)
        self.k = 0  # steps taken
        self.last_normed = None

    def step(self, g):
        g = np.array(g, dtype=np.float64)
        if self.maximize:
            g = -g
        if self.wd and not self.decouple:
            g = g + self.wd * self.theta  # L2: the decay is part of the gradient, v included
        k, self.k = self.k, self.k + 1
        if k == 0:
            self.v = g * g
            return
        if self.wd and self.decouple:
            self.theta = self.theta * (1 - self.lr * self.wd)
        n = g / np.maximum(np.sqrt(self.v), self.eps)
        if self.c is not None:
            n = np.clip(n, -(k ** self.c), k ** self.c)
        self.last_normed = n
        self.m = self.b1 * self.m + (1 - self.b1) * n
        self.theta = self.theta - self.lr * self.m
        self.v = self.b2 * self.v + (1 - self.b2) * g * g


def grad_fn(theta: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """A gradient that depends on the parameters (a noisy quadratic with a sin term)."""
    return 0.5 * theta + np.sin(theta * (t % 7 + 1)) + rng.standard_normal(theta.shape)


SHAPES = [(7,), (4, 5), (2, 3, 2, 2), ()]
CONFIGS = [
    {},
    {"betas": (0.0, 0.5)},
    {"betas": (0.5, 0.99), "clip_exp": None},
    {"eps": 1e-2, "clip_exp": 0.5},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decouple": True},
    {"maximize": True, "lr": 1e-2},
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_matches_float64_reference(shape, kw):
    rng = np.random.default_rng(0)
    theta0 = rng.standard_normal(shape)
    p = nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = ADOPT([p], **{"lr": 1e-2, **kw})
    b1, b2 = kw.get("betas", (0.9, 0.9999))
    ref = ReferenceADOPT(theta0, lr=kw.get("lr", 1e-2), beta1=b1, beta2=b2, eps=kw.get("eps", 1e-6),
                         clip_exp=kw.get("clip_exp", 0.25), wd=kw.get("weight_decay", 0.0),
                         decouple=kw.get("decouple", False), maximize=kw.get("maximize", False))
    for t in range(60):
        g = grad_fn(ref.theta, t, rng)
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        ref.step(g)
        np.testing.assert_allclose(p.detach().numpy(), ref.theta, rtol=1e-10, atol=1e-12)
    st = opt.state[p]
    np.testing.assert_allclose(st["exp_avg"].numpy(), ref.m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(st["exp_avg_sq"].numpy(), ref.v, rtol=1e-10, atol=1e-12)
    assert int(st["step"]) == 60


def test_zero_first_gradient_floor_and_clip_act():
    """g_1 = 0 leaves v = 0: at the first update the eps floor makes g/eps huge and the clip (1^(1/4) = 1)
    bounds it, so theta moves by exactly lr * (1 - beta1) per coordinate."""
    theta0 = np.array([0.3, -1.0, 2.0, 0.0])
    p = nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = ADOPT([p], lr=0.1)
    ref = ReferenceADOPT(theta0, lr=0.1)
    g2 = np.array([0.5, -2e-3, 1e-9, 0.0])
    rng = np.random.default_rng(1)
    for t, g in enumerate([np.zeros(4), g2] + [rng.standard_normal(4) for _ in range(30)]):
        p.grad = torch.tensor(g)
        opt.step()
        ref.step(g)
        if t == 0:
            assert torch.equal(p.detach(), torch.tensor(theta0))  # the first step does not move theta
            assert torch.equal(opt.state[p]["exp_avg_sq"], torch.zeros(4))
        if t == 1:
            # floor: 1e-9 / 1e-6 = 1e-3 is below the clip; the others are clipped to +-1; 0 stays 0
            np.testing.assert_allclose(ref.last_normed, [1.0, -1.0, 1e-3, 0.0], rtol=1e-12)
            np.testing.assert_allclose(p.detach().numpy(), theta0 - 0.1 * 0.1 * np.array([1.0, -1.0, 1e-3, 0.0]),
                                       rtol=1e-12)
        np.testing.assert_allclose(p.detach().numpy(), ref.theta, rtol=1e-10, atol=1e-12)
    # a zero first gradient without the clip would have moved theta by lr * (1 - beta1) * 0.5 / 1e-6
    unclipped = ReferenceADOPT(theta0, lr=0.1, clip_exp=None)
    unclipped.step(np.zeros(4))
    unclipped.step(g2)
    assert abs(unclipped.theta[0] - theta0[0]) > 1e3


def test_v_is_updated_after_the_step():
    """The update at step t is normalised by v from g_1..g_{t-1} only (impulse response)."""
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = ADOPT([p], lr=1.0, betas=(0.0, 0.5), clip_exp=None)
    for g, expected_move in ((2.0, 0.0), (4.0, -4.0 / 2.0), (1.0, -1.0 / math.sqrt(0.5 * 4 + 0.5 * 16))):
        before = p.item()
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        assert p.item() - before == pytest.approx(expected_move, rel=1e-12)


def test_clip_bound_grows_as_step_to_the_quarter():
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = ADOPT([p], lr=1.0, betas=(0.0, 0.9999), eps=1e-6)
    p.grad = torch.tensor([1e-6], dtype=torch.float64)
    opt.step()  # v = 1e-12: sqrt(v) = 1e-6 = the floor
    for k in range(1, 20):
        before = p.item()
        p.grad = torch.tensor([1e3], dtype=torch.float64)  # g / sqrt(v) is huge: always clipped
        opt.step()
        assert before - p.item() == pytest.approx(k ** 0.25, rel=1e-12)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(48, 2))


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 + t)
        x = torch.randn(4, 2, 6, 6, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("name,kw", [("adopt", {}), ("adopt", {"weight_decay": 0.1, "decouple": True}),
                                     ("adamw", {})])
@pytest.mark.parametrize("save_at", [1, 2, 10])
def test_resume_bit_identical_with_weights_only_load(name, kw, save_at):
    total = 25
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


def test_state_holds_only_tensors():
    m = _model()
    opt = ADOPT(m.parameters())
    _train(m, opt, 3)
    for state in opt.state.values():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        assert state["step"].dtype == torch.int64 and int(state["step"]) == 3


def test_loaded_state_follows_parameter_dtype():
    p = nn.Parameter(torch.randn(3, dtype=torch.float64))
    o = ADOPT([p])
    for _ in range(3):
        p.grad = torch.randn(3, dtype=torch.float64)
        o.step()
    q = nn.Parameter(p.detach().float())
    o2 = ADOPT([q])
    o2.load_state_dict(o.state_dict())
    assert o2.state[q]["exp_avg_sq"].dtype == torch.float32
    q.grad = torch.randn(3)
    o2.step()
    assert int(o2.state[q]["step"]) == 4


# --- the torch.optim contract -----------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"lr": -1.0}, "Invalid learning rate: -1.0"),
    ({"lr": "0.1"}, "Invalid learning rate"),
    ({"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0"),
    ({"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1"),
    ({"betas": (0.9,)}, "Invalid betas"),
    ({"eps": -1e-6}, "Invalid epsilon value"),
    ({"clip_exp": -0.25}, "Invalid clip_exp value"),
    ({"clip_exp": "0.25"}, "Invalid clip_exp value"),
    ({"weight_decay": -0.1}, "Invalid weight_decay value"),
    ({"decouple": 1}, "Invalid decouple value"),
    ({"maximize": "yes"}, "Invalid maximize value"),
])
def test_invalid_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ADOPT([nn.Parameter(torch.ones(1))], **kwargs)


def test_param_groups_are_validated_and_keep_their_own_hyper_parameters():
    a, b = nn.Parameter(torch.zeros(3, dtype=torch.float64)), nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ADOPT([{"params": [a]}, {"params": [b], "lr": 0.5, "clip_exp": None}], lr=0.1)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "betas": (0.9, 1.5)})
    for g in ([1.0, 2.0, 3.0], [2.0, 1.0, 0.5]):
        a.grad = torch.tensor(g, dtype=torch.float64)
        b.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    ra, rb = ReferenceADOPT(np.zeros(3), lr=0.1), ReferenceADOPT(np.zeros(3), lr=0.5, clip_exp=None)
    for g in ([1.0, 2.0, 3.0], [2.0, 1.0, 0.5]):
        ra.step(g)
        rb.step(g)
    np.testing.assert_allclose(a.detach().numpy(), ra.theta, rtol=1e-12)
    np.testing.assert_allclose(b.detach().numpy(), rb.theta, rtol=1e-12)


def test_closure_grad_none_and_sparse():
    p, idle = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = ADOPT([p, idle])

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 2.0
    assert opt.step(closure).item() == 2.0  # the first step did not move p
    assert idle not in opt.state and torch.equal(idle.detach(), torch.ones(2))  # grad None: untouched
    emb = nn.Embedding(4, 2, sparse=True)
    opt = ADOPT(emb.parameters())
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_lr_scheduler_and_grad_scaler_skipped_steps():
    p = nn.Parameter(torch.ones(3))
    opt = ADOPT([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    for bad in (False, True, False, False):
        opt.zero_grad()
        scaler.scale((p * (float("inf") if bad else 1.0)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    assert int(opt.state[p]["step"]) == 3  # the inf step never reached ADOPT
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 4)


def test_float32_bfloat16_complex_and_0d():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(20)]

    def run(dtype):
        p = nn.Parameter(torch.zeros(6, dtype=dtype))
        o = ADOPT([p], lr=1e-2)
        for g in grads:
            p.grad = g.to(dtype)
            o.step()
        assert o.state[p]["exp_avg"].dtype == o.state[p]["exp_avg_sq"].dtype == dtype
        return p.detach().double()

    ref = run(torch.float64)
    assert torch.allclose(run(torch.float32), ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(run(torch.bfloat16), ref, atol=0.02 * ref.abs().max().item())
    # a complex parameter is its real and imaginary parts as separate coordinates (torch.optim's rule)
    z = nn.Parameter(torch.zeros(3, dtype=torch.complex128))
    r = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    oz, o_r = ADOPT([z], lr=1e-2), ADOPT([r], lr=1e-2)
    for g in grads:
        z.grad = torch.view_as_complex(g.reshape(3, 2).contiguous())
        r.grad = g.reshape(3, 2).clone()
        oz.step()
        o_r.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    s = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    o, ref0 = ADOPT([s], lr=0.1), ReferenceADOPT(1.0, lr=0.1)
    for g in (0.5, -1.0, 2.0):
        s.grad = torch.tensor(g, dtype=torch.float64)
        o.step()
        ref0.step(g)
    assert s.shape == () and s.item() == pytest.approx(float(ref0.theta), rel=1e-12) and s.item() != 1.0


# --- the factory ------------------------------------------------------------------------------
def test_factory_names_and_defaults():
    d = list_optimizers()
    assert d["adopt"] == {"lr": 1e-3, "betas": (0.9, 0.9999), "eps": 1e-6, "clip_exp": 0.25,
                          "weight_decay": 0.0, "decouple": False}  # the official implementation's defaults
    assert d["adamw"] == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}  # torch's
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    adamw = build_optimizer("adamw", model)
    assert type(adamw) is torch.optim.AdamW
    decay, no_decay = adamw.param_groups  # torch's default decay, but not on biases and norm parameters
    assert decay["weight_decay"] == 1e-2 and [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert no_decay["weight_decay"] == 0.0
    adopt = build_optimizer("adopt", model, lr=3e-3, decouple=True, weight_decay=0.1)
    assert type(adopt) is ADOPT and adopt.param_groups[0]["decouple"] is True
    with pytest.raises(ValueError, match="'adopt' does not take keep_num: allowed are betas, clip_exp, decouple"):
        build_optimizer("adopt", model, keep_num=3)


def test_list_shows_adopt_and_adamw(capsys):
    assert train.main(["--list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert "clip_exp=0.25" in lines["adopt"] and "betas=(0.9, 0.9999)" in lines["adopt"]
    assert "weight_decay=0.01" in lines["adamw"]
    blocks = [line for line in out.splitlines() if "optimizer blocks" in line]
    assert len(blocks) == len(TASKS)  # one line per task
    for line in blocks:
        names = line.split("optimizer blocks")[1].replace(",", " ").split()
        assert "adopt" in names and "adamw" in names, line


def test_clip_exp_null_on_the_command_line_turns_the_clip_off():
    assert train.resolve_optimizer("adopt", {}, {"clip_exp": None})["clip_exp"] is None
    with pytest.raises(train.UserError, match="invalid optimizer.lr None for 'adopt': allowed is a number"):
        train.resolve_optimizer("adopt", {}, {"lr": None})


@pytest.mark.parametrize("cfg", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_has_adopt_and_adamw_blocks_that_build(cfg):
    text = cfg.read_text()
    opt = yaml.safe_load(text)["optimizer"]
    assert set(opt) >= {"adopt", "adamw"}
    for name in ("adopt", "adamw"):
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{name}:"))
        assert "#" in line, f"{cfg.name}: the {name} block names its source"
        o = build_optimizer(name, [nn.Parameter(torch.ones(2, 2))], **opt[name])
        assert o.param_groups[0]["lr"] == opt[name]["lr"]


# --- the correlation callback -----------------------------------------------------------------
def _drive(opt_factory, steps, shape=(32, 32), **cb_kwargs):
    p = nn.Parameter(torch.zeros(shape))
    opt = opt_factory([p])
    cb = MomentCorrelation(**cb_kwargs)
    assert cb.attach(opt, {p: "w"})
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=gen)
        opt.step()
    return cb, opt, p


def test_correlation_reads_the_v_that_divided_g():
    """The adapter gives v_{t-1} (the v before the step, which divided g_t), not the stored v_t."""
    p = nn.Parameter(torch.zeros(8, 8))
    opt = ADOPT([p], betas=(0.9, 0.99))
    cb = MomentCorrelation(every_n_steps=1, num_coords=64, lags=())
    cb.attach(opt, {p: "w"})
    tr = cb.trackers[0]
    before = []
    opt.register_step_pre_hook(lambda o, a, k: before.append(o.state[p]["exp_avg_sq"].clone()
                                                             if p in o.state else None))
    gen = torch.Generator().manual_seed(0)
    for t in range(30):
        p.grad = torch.randn(8, 8, generator=gen) * (1 + t % 3)
        opt.step()
        got = tr._gather("v")
        if t == 0:
            assert torch.isnan(got).all()  # the first step only initialises v: nothing divided g_1 (no sample)
            continue
        want = before[-1].reshape(-1)[tr.entries[0][3]]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(got, opt.state[p]["exp_avg_sq"].reshape(-1)[tr.entries[0][3]], rtol=1e-3)
    assert tr._group_scalars()[1] == 1.0  # no bias correction


def test_adopt_iid_is_decorrelated_and_adamw_reads_like_adam():
    # beta2 = 0.9: Adam-type v gives sqrt(1 - 0.81) = 0.436 here, so a leak of g_t into v would show most
    cb, _, _ = _drive(lambda ps: ADOPT(ps, betas=(0.0, 0.9)), 1500, start_step=50)
    res = cb.compute()
    assert abs(res["overall"]["g2_v"]) < 0.02 and abs(res["overall"]["absg_step"]) < 0.02
    assert res["samples"] > 100
    cb, _, _ = _drive(lambda ps: build_optimizer("adamw", ps, betas=(0.0, 0.9)), 1500, start_step=50)
    assert cb.compute()["overall"]["g2_v"] == pytest.approx(math.sqrt(1 - 0.81), abs=0.03)


def test_paper_protocol_adopt_is_decorrelated_adamw_is_not():
    # the optimizers' own beta2 is 0.9999 / 0.999; the protocol recomputes v with 0.9 (Appendix C)
    cb, _, _ = _drive(lambda ps: build_optimizer("adopt", ps), 1500, protocol="paper", start_step=50)
    assert abs(cb.compute()["overall"]["g2_v"]) < 0.02
    cb, _, _ = _drive(lambda ps: build_optimizer("adamw", ps), 1500, protocol="paper", start_step=50)
    assert cb.compute()["overall"]["g2_v"] == pytest.approx(math.sqrt(1 - 0.81), abs=0.03)


def test_paper_protocol_recomputed_v_is_the_ema_of_earlier_gradients():
    """v_rec after step t = the beta 0.9 EMA of g_1^2 .. g_{t-1}^2 (un-bias-corrected), exactly."""
    p = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    # beta2 0.5: the innovations (v_t - beta2 v_{t-1}) / (1 - beta2) amplify the callback's float32 rounding
    # by 1 / (1 - beta2); a small amplification lets the check be tight
    opt = ADOPT([p], betas=(0.9, 0.5))
    cb = MomentCorrelation(protocol="paper", every_n_steps=1, num_coords=5, lags=())
    cb.attach(opt, {p: "w"})
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(12)]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    tr = cb.trackers[0]
    idx = tr.entries[0][3]
    want = torch.zeros(5, dtype=torch.float64)
    for g in grads[:-1]:
        want = 0.9 * want + 0.1 * g * g
    assert bool((tr.v_rec_count == len(grads) - 1).all())  # per coordinate (grad-None steps are not counted)
    assert torch.allclose(tr.v_rec.double(), want[idx], rtol=1e-5)


def test_adopt_with_l2_decay_is_not_measured(caplog):
    cb, _, _ = _drive(lambda ps: ADOPT(ps, weight_decay=0.1), 50, every_n_steps=1)
    assert cb.compute()["samples"] == 0
    cb, _, _ = _drive(lambda ps: ADOPT(ps, weight_decay=0.1, decouple=True), 50, every_n_steps=1)
    assert cb.compute()["samples"] > 0


# --- every task trains with adopt and adamw ---------------------------------------------------
# (task, overrides that shrink it to a few seconds). Synthetic stand-ins everywhere.
TASKS = {
    "counterexample": ["--model.warmup_steps", "3", "--model.replicas", "4", "--data.steps_per_epoch", "5"],
    "counterexample_seq": ["--data.steps_per_epoch", "5"],
    "quadratic": ["--data.steps_per_epoch", "5"],
    "mnist_logreg": ["--data.source", "synthetic", "--data.synthetic_sizes", "[64,16,16]", "--data.batch_size", "16"],
    "mnist_mlp": ["--data.source", "synthetic", "--data.synthetic_sizes", "[64,16,16]", "--data.batch_size", "16"],
    "cifar10_resnet18": ["--data.source", "synthetic", "--model.width", "4", "--data.synthetic_sizes", "[16,4,4]",
                         "--data.batch_size", "4"],
    "cifar10_densenet": ["--data.source", "synthetic", "--model.depth", "10", "--model.growth_rate", "4",
                         "--data.synthetic_sizes", "[16,4,4]", "--data.batch_size", "4"],
    "tinyimagenet_densenet": ["--data.source", "synthetic", "--model.depth", "10", "--model.growth_rate", "4",
                              "--model.stem_stride", "2", "--data.synthetic_sizes", "[16,4,4]",
                              "--data.batch_size", "4"],
    "wgan_gp": ["--model.hidden", "16", "--model.n_critic", "2", "--data.batch_size", "32",
                "--data.epoch_length", "4"],
    "nmt": ["--model.embed_dim", "16", "--model.hidden", "16", "--model.beam_width", "1",
            "--data.synthetic_sizes", "[64,8,8]", "--data.batch_size", "16", "--data.eval_batch_size", "8"],
}


@pytest.mark.parametrize("optimizer", ["adopt", "adamw"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_trains(tmp_path, capsys, task, optimizer):
    steps = 6
    rc = train.main(["--log-dir", str(tmp_path), "--task", task, "--optimizer", optimizer,
                     "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "2",
                     "--correlation.every_n_steps", "1", "--correlation.log_every_n_steps", "2", *TASKS[task]])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0, out[-5:]
    s = json.loads((Path(out[-1]) / "summary.json").read_text())
    assert s["status"] == "completed" and not s["diverged"] and s["global_step"] == steps
    block = yaml.safe_load((ROOT / "configs" / f"{task}.yaml").read_text())["optimizer"][optimizer]
    assert s["hparams"]["optimizer"]["name"] == optimizer
    assert s["hparams"]["optimizer"]["lr"] == block["lr"]  # the config's block, not only factory defaults
    losses = [v for k, v in s["final_metrics"].items() if "loss" in k]
    assert losses and all(math.isfinite(v) for v in losses)
    assert s["correlation"]["optimizer_steps"] >= 1
