"""MomentCorrelation: known right answers on controlled gradient streams, exactness against numpy,
protocols, AMP skips, resume, and one short Trainer run.

Gradients are set by hand (p.grad = ...) and opt.step() fires the callback's post-step hook, so the
callback's core is tested without a Trainer. For i.i.d. gradients Adam's v_t = (1-b2) sum_k b2^k g_{t-k}^2
gives corr(g_t^2, v_t) = sqrt(1 - b2^2) (0.436, 0.141, 0.045); AdaShift's v_t is built from g_{t-n}: 0.
"""
from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from adashift_pl.callbacks import MomentCorrelation
from adashift_pl.optim import build_optimizer

SHAPE = (32, 32)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this module runs on one intra-op thread (see tests/conftest.py)."""


def drive(name: str, steps: int, beta2: float = 0.9, grads=None, opt_kwargs: dict | None = None,
          shape=SHAPE, seed: int = 0, **cb_kwargs):
    """Run ``steps`` optimizer steps on one parameter with a given gradient stream (default: i.i.d. N(0,1))."""
    p = nn.Parameter(torch.zeros(shape))
    opt = build_optimizer(name, [p], betas=(0.0, beta2), **(opt_kwargs or {}))
    cb = MomentCorrelation(**cb_kwargs)
    assert cb.attach(opt, {p: "w"})
    gen = torch.Generator().manual_seed(seed)
    stream = grads(gen) if grads else (torch.randn(shape, generator=gen) for _ in range(steps))
    for _, g in zip(range(steps), stream):
        p.grad = g
        opt.step()
    return cb, opt, p


@pytest.mark.parametrize("beta2, steps, burn_in, tol", [
    (0.9, 2000, 50, 0.03),
    (0.99, 3000, 500, 0.03),
    (0.999, 10000, 3000, 0.015),
])
def test_adam_iid_matches_sqrt_one_minus_beta2_squared(beta2, steps, burn_in, tol):
    # default sampling (K=256, a sample every 10 steps, window 2000); burn_in skips v's start from zero
    cb, _, _ = drive("adam", steps, beta2=beta2, start_step=burn_in)
    res = cb.compute()
    expected = math.sqrt(1 - beta2 ** 2)
    assert res["overall"]["g2_v"] == pytest.approx(expected, abs=tol)
    assert res["overall"]["absg_step"] < -0.5 * expected  # large gradients get small steps
    assert res["se"]["g2_v"] < 0.01
    for lag in (1, 2, 5, 10):
        assert abs(res["overall"][f"temporal_lag{lag}"]) < 0.02
        assert abs(res["overall"][f"spatial_lag{lag}"]) < 0.02


def test_nadam_and_adamw_read_exp_avg_sq():
    for make in (lambda p: build_optimizer("nadam", [p], betas=(0.0, 0.9)),
                 lambda p: torch.optim.AdamW([p], betas=(0.0, 0.9))):
        p = nn.Parameter(torch.zeros(SHAPE))
        opt = make(p)
        cb = MomentCorrelation(start_step=50)
        assert cb.attach(opt, {p: "w"})
        gen = torch.Generator().manual_seed(0)
        for _ in range(1500):
            p.grad = torch.randn(SHAPE, generator=gen)
            opt.step()
        assert cb.compute()["overall"]["g2_v"] == pytest.approx(math.sqrt(1 - 0.81), abs=0.03), type(opt)


@pytest.mark.parametrize("name, kwargs", [
    ("adashift", {"keep_num": 1}),
    ("adashift", {"keep_num": 3, "spatial_block": "row"}),
    ("adashift-mean", {"keep_num": 1}),
    ("non-adashift", {"keep_num": 1}),
    ("adashift-spatial", {}),
])
def test_adashift_iid_is_decorrelated(name, kwargs):
    # beta2 = 0.9: the largest Adam value (0.436), so a leak of g_t into v_t would show most here
    cb, _, _ = drive(name, 1500, beta2=0.9, opt_kwargs=kwargs, start_step=50)
    res = cb.compute()
    assert abs(res["overall"]["g2_v"]) < 0.02
    assert abs(res["overall"]["absg_step"]) < 0.02
    assert res["samples"] > 100


def test_pearson_equals_numpy_on_the_same_samples():
    shape, k, every = (10, 20), 50, 3
    p = nn.Parameter(torch.zeros(shape))
    opt = build_optimizer("adam", [p], betas=(0.0, 0.9), lr=1e-2)
    cb = MomentCorrelation(every_n_steps=every, num_coords=k, window=None, lags=(1, 2), seed=3)
    cb.attach(opt, {p: "w"})
    tr = cb.trackers[0]
    idx = tr.entries[0][3]
    record = []  # (g[idx], v_hat[idx]) after every step, read the same way the callback does

    def rec(optimizer, args, kwargs):
        st = optimizer.state[p]
        bc = 1 - 0.9 ** int(st["step"])
        record.append((p.grad.reshape(-1)[idx].double().numpy().copy(),
                       (st["exp_avg_sq"].reshape(-1)[idx] / bc).double().numpy().copy()))

    opt.register_step_post_hook(rec)  # runs after the callback's hook
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(shape, generator=gen) * 3 + 0.1  # per-coordinate scales: Pearson must not care
    steps = 240
    for t in range(steps):
        p.grad = scale * torch.randn(shape, generator=gen) * (1 + 0.5 * math.sin(t / 7))
        p.grad.view(-1)[idx[0]] = 0.0  # a constant coordinate: left out, not NaN
        opt.step()
    g = np.stack([r[0] for r in record])
    v = np.stack([r[1] for r in record])
    sampled = [t for t in range(1, steps + 1) if t % every == 0 and t > 2]  # 1-based; lags need t-2
    rows = np.array(sampled) - 1

    def mean_pearson(x, y):
        rs = [np.corrcoef(x[:, i], y[:, i])[0, 1] for i in range(x.shape[1])
              if x[:, i].std() > 0 and y[:, i].std() > 0]
        return float(np.mean(rs)), len(rs)

    lr, eps = 1e-2, opt.param_groups[0]["eps"]
    partner = tr.partner.numpy()
    want = {
        "g2_v": mean_pearson(g[rows] ** 2, v[rows]),
        "absg_step": mean_pearson(np.abs(g[rows]), lr / (np.sqrt(v[rows]) + eps)),
        "temporal_lag1": mean_pearson(g[rows], g[rows - 1]),
        "temporal_lag2": mean_pearson(g[rows], g[rows - 2]),
        "spatial_lag1": mean_pearson(g[rows], g[rows - 1][:, partner]),
        "spatial_lag2": mean_pearson(g[rows], g[rows - 2][:, partner]),
    }
    res = cb.compute()
    assert res["samples"] == len(sampled)
    assert idx.numel() == k
    for metric, (value, count) in want.items():
        assert res["overall"][metric] == pytest.approx(value, abs=2e-4), metric
        assert res["tensors"]["w"][metric] == pytest.approx(value, abs=2e-4), metric
    assert res["coords"]["w"] == want["g2_v"][1] == k - 1


def test_a_parameter_without_a_gradient_is_skipped_not_recorded_as_zero():
    """A tensor the loss did not use at a step has grad None, and Adam leaves its v alone: that step
    is no sample of it (not g = 0 against a stale v), and the other tensors are sampled as usual --
    also while the unused one has no v at all yet. Checked against numpy on the steps it was used."""
    k, steps, lr = 30, 240, 1e-2
    w, u = nn.Parameter(torch.zeros(8, 10)), nn.Parameter(torch.zeros(6, 10))
    opt = build_optimizer("adam", [w, u], betas=(0.0, 0.9), lr=lr)
    cb = MomentCorrelation(every_n_steps=1, num_coords=k, window=None, lags=(1,), seed=3)
    cb.attach(opt, {w: "w", u: "u"})
    idx = {name: entry[3] for name, entry in zip(cb.trackers[0].names, cb.trackers[0].entries)}
    record: dict[str, dict[int, tuple]] = {"w": {}, "u": {}}  # step -> (g, v_hat) at the sampled coordinates
    t = 0

    def rec(optimizer, args, kwargs):  # runs after the callback's hook
        for name, p in (("w", w), ("u", u)):
            if p.grad is not None:
                st = optimizer.state[p]
                v_hat = st["exp_avg_sq"].reshape(-1)[idx[name]] / (1 - 0.9 ** int(st["step"]))
                record[name][t] = (p.grad.reshape(-1)[idx[name]].double().numpy().copy(), v_hat.double().numpy())

    opt.register_step_post_hook(rec)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, steps + 1):
        scale = 1 + 0.5 * math.sin(t / 7)
        w.grad = scale * torch.randn(w.shape, generator=gen)
        used = t > 30 and t % 3 != 0  # u: no gradient for 30 steps, then none at every third step
        u.grad = scale * torch.randn(u.shape, generator=gen) if used else None
        opt.step()

    def mean_pearson(x, y):
        return float(np.mean([np.corrcoef(x[:, i], y[:, i])[0, 1] for i in range(x.shape[1])]))

    res = cb.compute()
    eps = opt.param_groups[0]["eps"]
    for name in ("w", "u"):
        seen = record[name]
        sampled = [s for s in sorted(seen) if s - 1 in seen]  # g_t, v_t and the lag-1 gradient all there
        g = np.stack([seen[s][0] for s in sampled])
        v = np.stack([seen[s][1] for s in sampled])
        g_prev = np.stack([seen[s - 1][0] for s in sampled])
        assert len(sampled) == (steps - 1 if name == "w" else 70), name  # u: t = 32, 35, ..., 239
        want = {"g2_v": mean_pearson(g ** 2, v), "absg_step": mean_pearson(np.abs(g), lr / (np.sqrt(v) + eps)),
                "temporal_lag1": mean_pearson(g, g_prev)}
        for metric, value in want.items():
            assert res["tensors"][name][metric] == pytest.approx(value, abs=2e-4), (name, metric)
        assert res["coords"][name] == k
    assert res["samples"] == steps - 1


@pytest.mark.parametrize("name", ["adam", "adashift"])
def test_paper_protocol_updates_v_only_where_there_was_a_gradient(name):
    """The recomputed v of a tensor without a gradient at a step is neither decayed nor fed g = 0."""
    w, u = nn.Parameter(torch.zeros(4, 8)), nn.Parameter(torch.zeros(4, 8))
    opt = build_optimizer(name, [w, u], betas=(0.0, 0.9), **({"keep_num": 1} if name == "adashift" else {}))
    cb = MomentCorrelation(every_n_steps=1, num_coords=16, window=None, lags=(1,), protocol="paper")
    cb.attach(opt, {w: "w", u: "u"})
    gen = torch.Generator().manual_seed(0)
    used = 0
    for t in range(1, 121):
        w.grad = torch.randn(w.shape, generator=gen)
        u.grad = torch.randn(u.shape, generator=gen) if t % 4 else None
        used += u.grad is not None
        opt.step()
    tr = cb.trackers[0]
    w_rows, u_rows = tr.segment == 0, tr.segment == 1
    ready_from = 2 if name == "adashift" else 1  # AdaShift (n = 1) has a v from its second gradient on
    assert (tr.v_rec_count[w_rows] == 120 - ready_from + 1).all()
    assert (tr.v_rec_count[u_rows] == used - ready_from + 1).all()
    res = cb.compute()
    assert all(math.isfinite(res["tensors"]["u"][m]) for m in ("g2_v", "absg_step", "temporal_lag1"))


def test_planted_temporal_and_spatial_correlation():
    # g_t[i] = e_t[i] + u_t + u_{t-1} with u shared by all coordinates (an MA(1) common component):
    # corr(g_t[i], g_{t-1}[j]) = corr(g_t[i], g_{t-1}[i]) = 1/3 for any i, j; lag 2: 0.
    def grads(gen):
        u_prev = torch.randn((), generator=gen)
        while True:
            u = torch.randn((), generator=gen)
            yield torch.randn(SHAPE, generator=gen) + u + u_prev
            u_prev = u

    cb, _, _ = drive("adam", 3000, grads=grads, every_n_steps=1, lags=(1, 2), window=None)
    res = cb.compute()["overall"]
    assert res["temporal_lag1"] == pytest.approx(1 / 3, abs=0.05)
    assert res["spatial_lag1"] == pytest.approx(1 / 3, abs=0.05)
    assert abs(res["temporal_lag2"]) < 0.05 and abs(res["spatial_lag2"]) < 0.05


def test_amsgrad_uses_the_running_max():
    cb, opt, p = drive("amsgrad", 300, beta2=0.9, num_coords=16, every_n_steps=1)
    tr = cb.trackers[0]
    idx = tr.entries[0][3]
    assert torch.equal(tr._gather("v"), opt.state[p]["max_exp_avg_sq"].reshape(-1)[idx])


def test_block_resolution_v_is_broadcast_to_the_sampled_coordinates():
    shape = (6, 4, 5)
    cb, opt, p = drive("adashift", 20, shape=shape, opt_kwargs={"keep_num": 2, "spatial_block": "row"},
                       num_coords=40, every_n_steps=1)
    v = opt.state[p]["exp_avg_sq"]
    assert v.shape == (6, 1, 1)
    idx = cb.trackers[0].entries[0][3]
    assert torch.equal(cb.trackers[0]._gather("v"), v.expand(shape).reshape(-1)[idx])


def test_paper_protocol_recomputes_v_with_fixed_beta2():
    # Adam runs with beta2 = 0.999, the protocol recomputes v with 0.9 (Appendix C): 0.436
    cb, _, _ = drive("adam", 1500, beta2=0.999, protocol="paper", protocol_beta2=0.9, start_step=50)
    assert cb.compute()["overall"]["g2_v"] == pytest.approx(math.sqrt(1 - 0.81), abs=0.03)
    s = cb.summary()
    assert s["protocol"]["name"] == "paper" and s["protocol"]["beta2"] == 0.9
    # AdaShift's recomputed v is still built from phi(g_{t-n}^2): 0
    cb, _, _ = drive("adashift", 1500, beta2=0.999, opt_kwargs={"keep_num": 1}, protocol="paper",
                     start_step=50)
    assert abs(cb.compute()["overall"]["g2_v"]) < 0.02
    live = MomentCorrelation()
    assert live.protocol_info()["name"] == "live"


def test_paper_protocol_freezes_parameters():
    target = torch.randn(8, 8)
    p, other = nn.Parameter(torch.zeros(8, 8)), nn.Parameter(torch.zeros(8))
    opt = build_optimizer("adam", [p, other], lr=0.05)
    cb = MomentCorrelation(protocol="paper", freeze_after_step=20, every_n_steps=1, lags=(1,), include=["w"])
    cb.attach(opt, {p: "w", other: "other"})
    assert cb.trackers[0].names == ["w"]
    gen = torch.Generator().manual_seed(0)
    for t in range(40):
        opt.zero_grad()
        noise = torch.randn(8, 8, generator=gen)
        (0.5 * ((p - target) ** 2).sum() + (p * noise).sum() + ((other - 1) ** 2).sum()).backward()
        opt.step()
        if t + 1 == 20:
            fixed, fixed_other = p.detach().clone(), other.detach().clone()
    assert not torch.equal(fixed, torch.zeros(8, 8))
    assert torch.equal(p.detach(), fixed)  # the optimizer's updates after step 20 were undone ...
    assert torch.equal(other.detach(), fixed_other)  # ... for the untracked parameters too
    assert cb.compute()["samples"] == 19  # steps 22..40: lag 1 needs step 21's gradient


def test_sgd_is_skipped_with_one_line():
    p = nn.Parameter(torch.zeros(3))
    cb = MomentCorrelation()
    assert cb.attach(torch.optim.SGD([p], lr=0.1)) is False
    s = cb.summary()
    assert s["skipped"] == ["SGD"] and "v_t" in s["note"]


def test_gradscaler_skipped_steps_are_not_seen():
    p = nn.Parameter(torch.ones(4, 4))
    opt = torch.optim.Adam([p], lr=1e-3)
    cb = MomentCorrelation(every_n_steps=1, lags=(1,))
    cb.attach(opt, {p: "w"})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    for bad in (False, True, False):
        opt.zero_grad()
        scaler.scale((p * torch.randn(4, 4)).sum()).backward()
        if bad:
            p.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    assert cb.trackers[0].step == 2  # the inf step never reached optimizer.step()


def test_state_survives_resume_exactly():
    def stream(gen):
        while True:
            yield torch.randn(SHAPE, generator=gen)

    kw = dict(every_n_steps=3, window=50, lags=(1, 4))
    full, _, _ = drive("adam", 400, **kw)

    # the same stream, interrupted after 200 steps: state through torch.save / load(weights_only=True)
    p = nn.Parameter(torch.zeros(SHAPE))
    opt = build_optimizer("adam", [p], betas=(0.0, 0.9))
    cb = MomentCorrelation(**kw)
    cb.attach(opt, {p: "w"})
    gen = torch.Generator().manual_seed(0)
    grads = stream(gen)
    for _ in range(200):
        p.grad = next(grads)
        opt.step()
    buf = io.BytesIO()
    torch.save({"cb": cb.state_dict(), "opt": opt.state_dict(), "p": p.detach().clone()}, buf)
    cb.detach()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    p2 = nn.Parameter(ckpt["p"])
    opt2 = build_optimizer("adam", [p2], betas=(0.0, 0.9))
    opt2.load_state_dict(ckpt["opt"])
    cb2 = MomentCorrelation(**kw)
    cb2.load_state_dict(ckpt["cb"])  # Lightning restores callbacks before on_fit_start attaches
    cb2.attach(opt2, {p2: "w"})
    for _ in range(200):
        p2.grad = next(grads)
        opt2.step()
    a, b = full.compute(), cb2.compute()
    assert a["samples"] == b["samples"]
    for metric, value in a["overall"].items():
        assert b["overall"][metric] == pytest.approx(value, abs=1e-6), metric


def test_invalid_settings_name_the_value():
    for kwargs, word in (({"protocol": "exact"}, "protocol"), ({"num_coords": 0}, "num_coords"),
                         ({"lags": [0]}, "lags"), ({"window": 0}, "window"),
                         ({"freeze_after_step": 5}, "freeze_after_step")):
        with pytest.raises(ValueError, match=word):
            MomentCorrelation(**kwargs)


def test_trainer_integration(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return build_optimizer("adashift", self, lr=1e-2, keep_num=2)

    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 16, generator=gen), torch.randint(2, (256,), generator=gen))
    cb = MomentCorrelation(every_n_steps=1, log_every_n_steps=16, lags=(1,))
    trainer = L.Trainer(max_steps=48, logger=TensorBoardLogger(tmp_path, name="tiny"), callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=16, accelerator="cpu", devices=1)
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=16))
    s = cb.summary()
    assert s["optimizer_steps"] == 48 and s["protocol"]["name"] == "live"
    assert set(s["tensors"]) == {"net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias"}
    assert s["overall"]["g2_v"] is not None and -1 <= s["overall"]["g2_v"] <= 1
    with open(tmp_path / "tiny" / "version_0" / "correlation.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["step"] for r in rows} == {"16", "32", "48"}  # 16 batches an epoch
    assert {r["tensor"] for r in rows} >= {"overall", "net.0.weight"}
    ea = EventAccumulator(str(tmp_path / "tiny" / "version_0")).Reload()
    assert "corr/g2_v/overall" in ea.Tags()["scalars"]
    assert "corr/absg_step/net.1.weight" in ea.Tags()["scalars"]

    # resume from an end-of-epoch checkpoint: the callback continues its counts instead of starting over
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    samples = s["samples"]
    cb2 = MomentCorrelation(every_n_steps=1, log_every_n_steps=16, lags=(1,))
    trainer2 = L.Trainer(max_steps=64, logger=False, callbacks=[cb2], enable_checkpointing=False,
                         default_root_dir=tmp_path / "resumed",
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer2.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=16), ckpt_path=ckpt)
    s2 = cb2.summary()
    assert s2["optimizer_steps"] == 64 and s2["samples"] == samples + 16
    assert not (tmp_path / "resumed" / "correlation.csv").exists()  # logger=False: no files


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_with_a_gradscaler():
    p = nn.Parameter(torch.zeros(SHAPE, device="cuda"))
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.0, 0.9))
    cb = MomentCorrelation(start_step=50)
    cb.attach(opt, {p: "w"})
    scaler = torch.amp.GradScaler("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for t in range(2000):
        opt.zero_grad()
        scaler.scale((p * torch.randn(SHAPE, device="cuda", generator=gen)).sum()).backward()
        if t == 100:
            p.grad[0, 0] = float("inf")  # skipped by the scaler: never seen
        scaler.step(opt)
        scaler.update()
    assert cb.trackers[0].step == 1999
    assert cb.compute()["overall"]["g2_v"] == pytest.approx(math.sqrt(1 - 0.81), abs=0.03)


def test_max_tensors_spans_the_model():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(10)])  # 20 tensors
    opt = torch.optim.Adam(model.parameters())
    cb = MomentCorrelation(max_tensors=4)
    cb.attach(opt, {p: n for n, p in model.named_parameters()})
    assert cb.trackers[0].names == ["0.weight", "3.weight", "6.bias", "9.bias"]  # first, last, evenly between
    assert cb.summary()["protocol"]["max_tensors"] == 4


def test_sampled_coordinates_are_the_same_on_every_rank():
    # what two DDP ranks do: same seed and names, whatever each process's global RNG state is
    picks = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
        cb = MomentCorrelation(num_coords=32, seed=5)
        cb.attach(torch.optim.Adam(model.parameters()), {p: n for n, p in model.named_parameters()})
        picks.append([e[3].tolist() for e in cb.trackers[0].entries] + [cb.trackers[0].partner.tolist()])
    assert picks[0] == picks[1]
