"""The data-free tasks: Eq. 7 counterexample, Eq. 6 sequential counterexample, Appendix L quadratic."""

from __future__ import annotations

import math

import pytest
import torch

from adashift_pl.optim import build_optimizer
from adashift_pl.tasks import counterexample, counterexample_seq, quadratic


def ce(**kw):
    opt = kw.pop("optimizer", {"name": "adam", "lr": 0.1, "betas": [0.0, 0.999]})
    return counterexample.Counterexample(optimizer=opt, **kw)


def test_counterexample_gradients_follow_eq7():
    m = ce(replicas=4000, seed=3)
    g = m.gradients_at(0)
    assert set(g.unique().tolist()) <= {101.0, -1.0}
    p = (1 + 0.02) / 102
    assert (g == 101.0).double().mean().item() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 4000))
    assert g.mean().item() == pytest.approx(0.02, abs=0.5)  # E[grad] = delta (noisy at this K)


def test_counterexample_common_random_numbers():
    a = ce(seed=5, replicas=1000, optimizer={"name": "adam", "lr": 0.1})
    b = ce(seed=5, replicas=1000, optimizer={"name": "adashift", "lr": 1.0, "keep_num": 1})
    assert torch.equal(a.gradients_at(123), b.gradients_at(123))  # same seed: same sequence, any optimizer
    assert not torch.equal(a.gradients_at(123), a.gradients_at(124))
    assert not torch.equal(ce(seed=6, replicas=1000).gradients_at(123), a.gradients_at(123))


def _simulate(model, steps):
    """Drive the module by hand: gradient of the summed loss, optimizer step, projection."""
    cfg = model.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    for t in range(steps):
        opt.zero_grad()
        theta = model.thetas()
        (model.gradients_at(t).float() * theta).sum().backward()
        opt.step()
        sched.step()
        if model.hparams.project:
            with torch.no_grad():
                for p in model.parameters():
                    p.clamp_(-model.hparams.bound, model.hparams.bound)
    return model.thetas().detach().clone(), opt


def test_counterexample_warmup_moves_state_not_theta():
    m = ce(replicas=5, warmup_steps=20)
    theta, opt = _simulate(m, 20)
    assert torch.equal(theta, torch.zeros(5))  # exact: lr 0
    state = opt.state[m.theta]
    assert int(state["step"]) == 20 and state["exp_avg_sq"].abs().sum() > 0
    theta, _ = _simulate(ce(replicas=5, warmup_steps=20), 21)
    assert not torch.equal(theta, torch.zeros(5))


@pytest.mark.parametrize("name, extra", [("adashift", {"keep_num": 1, "spatial_block": "row"}),
                                         ("adam", {}), ("amsgrad", {})])
def test_counterexample_replicas_are_independent(name, extra):
    """Replica k of a K-replica run == a 1-replica run fed replica k's gradients (rows and scalars)."""
    opt = {"name": name, "lr": 0.05, "betas": [0.0, 0.999], **extra}
    rows = _simulate(ce(replicas=6, warmup_steps=3, seed=1, optimizer=opt), 40)[0]
    scalars = _simulate(ce(replicas=6, warmup_steps=3, seed=1, layout="scalars",
                           optimizer={k: v for k, v in opt.items() if k != "spatial_block"}), 40)[0]
    torch.testing.assert_close(rows, scalars, rtol=0, atol=1e-6)
    # one replica alone with the same coin sequence as replica 2
    solo = torch.nn.Parameter(torch.zeros(1, 1))
    o = build_optimizer(params=[solo], **opt)
    full = ce(replicas=6, seed=1)
    for t in range(40):
        o.zero_grad()
        lr_factor = 0.0 if t < 3 else 1.0
        for g in o.param_groups:
            g["lr"] = 0.05 * lr_factor
        (full.gradients_at(t)[2].float() * solo).sum().backward()
        o.step()
    torch.testing.assert_close(rows[2], solo.detach()[0, 0], rtol=0, atol=1e-6)


def test_counterexample_projection():
    theta, _ = _simulate(ce(replicas=4, warmup_steps=0, project=True, bound=0.05,
                            optimizer={"name": "sgd", "lr": 0.01}), 30)
    assert theta.abs().max().item() <= 0.05 + 1e-7 and theta.abs().max().item() > 0.04


def test_counterexample_rows_layout_refuses_tensor_blocks():
    from adashift_pl.errors import UserError

    m = ce(optimizer={"name": "adashift", "lr": 0.1, "keep_num": 1})
    with pytest.raises(UserError, match="couple"):
        m.configure_optimizers()
    ce(layout="scalars", optimizer={"name": "adashift", "lr": 0.1, "keep_num": 1}).configure_optimizers()


def test_counterexample_seq_gradients_follow_eq6():
    m = counterexample_seq.CounterexampleSeq(optimizer={"name": "adam"}, C=6.0, d=6)
    grads = [m.gradient_at(s) for s in range(12)]
    assert grads == [6.0, -1, -1, -1, -1, -1] * 2  # t = s + 1; C at t mod d = 1
    assert sum(grads[:6]) == 1.0


def test_quadratic_expected_loss_is_eq45():
    m = quadratic.Quadratic(optimizer={"name": "sgd"}, dim=5, cond=1e3, seed=2)
    s = torch.linalg.svdvals(m.A)
    assert (s.max() / s.min()).item() == pytest.approx(1e3, rel=1e-6)
    # Monte-Carlo estimate of E‖(W1W2 − A)x‖² agrees with the closed form ‖W1W2 − A‖_F²
    x = torch.randn(200000, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    M = m.W1.detach().double() @ m.W2.detach().double() - m.A
    mc = (x @ M.T).pow(2).sum(1).mean()
    assert mc.item() == pytest.approx(m.expected_loss().item(), rel=0.02)
    # the same A for every seed, a different start
    m2 = quadratic.Quadratic(optimizer={"name": "sgd"}, dim=5, cond=1e3, seed=3)
    assert torch.equal(m.A, m2.A) and not torch.equal(m.W1, m2.W1)


@pytest.mark.parametrize("kind, at_half, at_end", [("fixed", 1.0, 1.0), ("linear", 0.505, 0.01),
                                                   ("exp", 0.1, 0.01)])
def test_quadratic_lr_schedules(kind, at_half, at_end):
    f = quadratic.LRSchedule(kind, 100, 0.01)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(at_half)
    assert f(100) == pytest.approx(at_end) and f(1000) == pytest.approx(at_end)


@pytest.mark.parametrize("make", [lambda **kw: ce(**kw),
                                  lambda **kw: counterexample_seq.CounterexampleSeq(optimizer={"name": "adam"}, **kw)])
def test_projection_bound_must_be_positive(make):
    from adashift_pl.errors import UserError

    with pytest.raises(UserError, match="invalid model.bound -1"):
        make(project=True, bound=-1.0)
