"""MomentCorrelation: the paper's g_t-v_t correlation (Section 3.3, Appendix C), measured live.

For a fixed random sample of K coordinates i of every tracked parameter tensor it keeps streaming
co-moments over time and reports, per tensor and overall (averaged over the sampled coordinates):

  g2_v           corr(g_t[i]^2, v_t[i])       v_t = the bias-corrected second moment that divides g_t's
                                              own update (Adam: exp_avg_sq after the step, so it holds g_t;
                                              AMSGrad: the running max; AdaShift: built from g_{t-n};
                                              phi = max/mean: the block's scalar; ADOPT: v_{t-1})
  absg_step      corr(|g_t[i]|, lr / (sqrt(v_t[i]) + eps))   the net-update-factor view (Section 3.3):
                                              negative = large gradients get small steps
  temporal_lagN  corr(g_t[i], g_{t-N}[i])     Appendix C, Table 1
  spatial_lagN   corr(g_t[i], g_{t-N}[j])     Appendix C, Table 2 (j != i: a fixed random partner of i
                                              in the same tensor)

Pearson is taken per coordinate over time and then averaged over coordinates (coordinates whose
series is constant over the window, e.g. always-zero gradients, are left out and counted). A step at
which a tracked parameter has no gradient (grad None: the loss did not use it, and the optimizer left
its v alone) is no sample of that parameter's coordinates -- nor is a later step whose lagged
gradient it would have been; the other parameters are sampled as usual.

How it sees the gradient the optimizer used: a ``register_step_post_hook`` on each optimizer. It fires
only when ``step()`` ran (not for steps the AMP GradScaler skipped), after AMP unscaling and gradient
clipping, with ``p.grad`` = g_t and the optimizer state holding v_t.

Streaming and bounded: exponentially weighted co-moments with horizon ``window`` optimizer steps
(weight of a sample decays as (1 - 1/window)^age; the first ``window`` samples are weighted equally, so
there is no start-up bias from the estimator itself), float32 on the parameters' device. Memory per
tensor is O(K * (3 + 2 * len(lags))) floats plus a ring of max(lags) gradient samples.

Protocols (recorded with every number):
  live   v_t as the optimizer keeps it.
  paper  After Appendix C, which trains the MNIST MLP "until converge", gathers the second hidden
         layer's gradient at every step and computes v_t and the correlations over "the last 10
         epochs". It states no beta2 and no schedule beyond that, so two settings here are ours:
         v is recomputed from the observed gradients with a fixed ``protocol_beta2`` -- default 0.9,
         an INFERENCE: Adam's reported 0.435885 equals sqrt(1 - 0.9^2), the value i.i.d. gradients
         give -- for Adam-type optimizers from g_t^2, for every other family from the innovations
         of its own v (so AdaShift's recomputed v is still built from phi(g_{t-n}^2)). Optionally
         the parameters are frozen after ``freeze_after_step`` optimizer steps, so that later
         gradients are samples at one fixed point (our stand-in for "until converge"; the paper
         does not freeze); measuring then starts.
"""
from __future__ import annotations

import csv
import fnmatch
import math
import os
import zlib
from typing import Any, Iterable

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

__all__ = ["MomentCorrelation", "PROTOCOLS"]

PROTOCOLS = ("live", "paper")
_TINY = 1e-30  # a series whose (normalised) variance is below this is constant: left out


# --------------------------------------------------------------------------------------------------
# Adapters: how one optimizer family exposes v_t.  Each works on one parameter's state and group.
# --------------------------------------------------------------------------------------------------
class _AdamAdapter:
    """torch.optim.Adam / AdamW (exp_avg_sq; amsgrad: max_exp_avg_sq) and NAdam (exp_avg_sq)."""

    name = "adam"
    elementwise_innovation = True  # the input of v's recurrence is g_t^2 itself
    bias_corrected = True  # v_hat = v / (1 - beta2^count)
    first_v_is_sample = False  # v starts from 0 (used with elementwise_innovation = False)

    def ready(self, state: dict, group: dict) -> bool:
        return "exp_avg_sq" in state

    def v(self, state: dict, group: dict, grad: Tensor | None) -> Tensor:
        return state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]

    def ema(self, state: dict, group: dict, grad: Tensor | None) -> Tensor:
        return state["exp_avg_sq"]

    def count(self, state: dict, group: dict) -> int:
        return int(state["step"])

    def running_max(self, group: dict) -> bool:
        return bool(group.get("amsgrad", False))


class _AdaShiftAdapter:
    """AdaShift (adashift, adashift-mean, non-adashift): v at block resolution from phi(g_{t-n}^2).

    No v while step <= keep_num; bias correction counts updates (CONTRACT)."""

    name = "adashift"
    elementwise_innovation = False
    bias_corrected = True
    first_v_is_sample = False

    def ready(self, state: dict, group: dict) -> bool:
        return int(state.get("updates", 0)) >= 1

    def v(self, state: dict, group: dict, grad: Tensor | None) -> Tensor:
        return state["exp_avg_sq"]

    ema = v

    def count(self, state: dict, group: dict) -> int:
        return int(state["updates"])

    def running_max(self, group: dict) -> bool:
        return False


class _AdaShiftSpatialAdapter(_AdaShiftAdapter):
    """AdaShiftSpatial: like Adam, but v = EMA of phi(g_t^2) at block resolution; counts ``step``."""

    name = "adashift-spatial"

    def ready(self, state: dict, group: dict) -> bool:
        return "exp_avg_sq" in state and int(state["step"]) >= 1

    def count(self, state: dict, group: dict) -> int:
        return int(state["step"])


class _ADOPTAdapter:
    """ADOPT: g_t is divided by max(sqrt(v_{t-1}), eps); v_t = beta2 v_{t-1} + (1 - beta2) g_t^2 is formed
    only after the parameter moved, and the first step only sets v_1 = g_1^2. No bias correction.

    After step t the state holds v_t, which already contains g_t; the v that divided g_t is recovered
    as v_{t-1} = (v_t - (1 - beta2) g_t^2) / beta2 (float32 rounding of v_t: ~1e-7 of v). So corr(g_t^2, v)
    reads ~0, like AdaShift's; in the paper protocol the innovations of v_{t-1} are g_{t-1}^2, so the
    recomputed v excludes g_t too. The step size read is lr / (sqrt(v) + eps), before ADOPT's clip.
    Not measurable (never ready): beta2 = 0 (v_{t-1} is not in the state) and L2 weight decay
    (decouple=False, weight_decay > 0: v took (g + wd * theta_{t-1})^2, and theta_{t-1} is gone)."""

    name = "adopt"
    elementwise_innovation = False
    bias_corrected = False
    first_v_is_sample = True  # v_1 = g_1^2: the first innovation is v_1 itself

    def ready(self, state: dict, group: dict) -> bool:
        return (int(state.get("step", 0)) >= 2  # v_{t-1} exists from step 2
                and group["betas"][1] > 0 and not _adopt_l2(group))

    def v(self, state: dict, group: dict, grad: Tensor | None) -> Tensor:
        v = state["exp_avg_sq"]
        if grad is None:  # the step skipped this parameter: v is the one its next gradient meets
            return v
        beta2 = group["betas"][1]
        return v.addcmul(grad, grad, value=-(1 - beta2)).div_(beta2).clamp_(min=0.0)

    ema = v

    def count(self, state: dict, group: dict) -> int:
        return int(state["step"]) - 1

    def running_max(self, group: dict) -> bool:
        return False


def _adopt_l2(group: dict) -> bool:
    return group["weight_decay"] != 0 and not group["decouple"]


def adapter_for(optimizer: torch.optim.Optimizer):
    """The adapter for ``optimizer``'s family, or None when it keeps no second moment (SGD, ...)."""
    try:
        from adashift_pl.optim import ADOPT, AdaShift, AdaShiftSpatial
    except ImportError:  # pragma: no cover - the optimizer package is part of this project
        ADOPT = AdaShift = AdaShiftSpatial = ()
    if ADOPT and isinstance(optimizer, ADOPT):
        if any(_adopt_l2(g) for g in optimizer.param_groups):
            rank_zero_info("MomentCorrelation: ADOPT with L2 weight decay (decouple=False) puts (g + wd*theta)^2 "
                           "into v, which the step hook cannot rebuild: no g_t-v_t correlation for those "
                           "parameters (decouple=True can be measured)")
        return _ADOPTAdapter()
    if AdaShiftSpatial and isinstance(optimizer, AdaShiftSpatial):
        return _AdaShiftSpatialAdapter()
    if AdaShift and isinstance(optimizer, AdaShift):
        return _AdaShiftAdapter()
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam)):
        return _AdamAdapter()
    return None


# --------------------------------------------------------------------------------------------------
# Streaming co-moments of (X-series, Y-series) pairs over K coordinates.
# --------------------------------------------------------------------------------------------------
class _CoMoments:
    """Exponentially weighted mean/variance/covariance, updated in place (Welford form, stable).

    With a_n = max(1/n, 1/window) the first ``window`` samples are an exact running (population)
    average, later ones decay with horizon ``window``; window=None keeps the exact average of all.
    n counts the samples of each coordinate: an update may skip some coordinates (``valid``)."""

    def __init__(self, num_x: int, pair_x: list[int], num_coords: int, device, window: float | None):
        self.pair_x = torch.tensor(pair_x, dtype=torch.long, device=device)
        shape_x, shape_y = (num_x, num_coords), (len(pair_x), num_coords)
        f32 = dict(dtype=torch.float32, device=device)
        self.mx, self.vxx = torch.zeros(shape_x, **f32), torch.zeros(shape_x, **f32)
        self.my, self.vyy, self.cxy = (torch.zeros(shape_y, **f32) for _ in range(3))
        self.n = torch.zeros(num_coords, dtype=torch.long, device=device)
        self.window = window

    def update(self, x: Tensor, y: Tensor, weight_steps: int = 1, valid: Tensor | None = None) -> None:
        """One sample of every coordinate, or of those where ``valid`` (the others keep their state)."""
        if valid is None:
            valid = torch.ones_like(self.n, dtype=torch.bool)
        self.n += valid
        a = 1.0 / self.n.clamp_min(1).float()
        if self.window is not None:
            a = a.clamp_min(min(1.0, weight_steps / self.window))
        a = torch.where(valid, a, 0.0)  # a = 0: no change at all
        dx = torch.where(valid, x - self.mx, 0.0)  # skipped coordinates may hold NaN
        dy = torch.where(valid, y - self.my, 0.0)
        self.mx.addcmul_(dx, a)
        self.my.addcmul_(dy, a)
        c = a * (1.0 - a)  # (1-a) * (S + a d d')
        self.vxx.mul_(1.0 - a).addcmul_(dx * dx, c)
        self.vyy.mul_(1.0 - a).addcmul_(dy * dy, c)
        self.cxy.mul_(1.0 - a).addcmul_(dx.index_select(0, self.pair_x) * dy, c)

    def pearson(self) -> tuple[Tensor, Tensor]:
        """Per pair and coordinate: (r, valid)."""
        vx = self.vxx.index_select(0, self.pair_x)
        valid = (vx > _TINY) & (self.vyy > _TINY)
        r = self.cxy / (vx * self.vyy).clamp_min(_TINY).sqrt()
        return torch.where(valid, r.clamp(-1.0, 1.0), torch.zeros_like(r)), valid

    def reset(self) -> None:
        for t in (self.mx, self.vxx, self.my, self.vyy, self.cxy, self.n):
            t.zero_()

    def state_dict(self) -> dict:
        return {"n": self.n.cpu(), "mx": self.mx.cpu(), "vxx": self.vxx.cpu(), "my": self.my.cpu(),
                "vyy": self.vyy.cpu(), "cxy": self.cxy.cpu()}

    def load_state_dict(self, sd: dict) -> None:
        self.n.copy_(torch.as_tensor(sd["n"]))  # a plain int in checkpoints before per-coordinate counts
        for k in ("mx", "vxx", "my", "vyy", "cxy"):
            getattr(self, k).copy_(sd[k])


def _sample_indices(numel: int, k: int, seed: int, name: str) -> Tensor:
    """K distinct flat indices of a tensor, fixed by (seed, name): the same on every rank and run."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    if numel <= k:
        return torch.arange(numel)
    if numel <= 4_000_000:
        return torch.randperm(numel, generator=gen)[:k].sort().values
    picks = torch.unique(torch.randint(numel, (4 * k,), generator=gen))  # sorted, distinct
    return picks[torch.randperm(picks.numel(), generator=gen)[:k]].sort().values


def _block_index(flat_idx: Tensor, shape: torch.Size, v_shape: torch.Size) -> Tensor:
    """Flat index into v (broadcastable to ``shape``) of each parameter coordinate in ``flat_idx``."""
    if len(v_shape) == 0 or math.prod(v_shape) == 1:
        return torch.zeros_like(flat_idx)
    v_shape = (1,) * (len(shape) - len(v_shape)) + tuple(v_shape)
    out = torch.zeros_like(flat_idx)
    rem, stride_v = flat_idx.clone(), 1
    for dim in reversed(range(len(shape))):
        coord = rem % shape[dim]
        rem = rem // shape[dim]
        if v_shape[dim] != 1:
            out += coord * stride_v
        stride_v *= v_shape[dim]
    return out


# --------------------------------------------------------------------------------------------------
# One tracked optimizer.
# --------------------------------------------------------------------------------------------------
class _Tracker:
    def __init__(self, cb: "MomentCorrelation", optimizer: torch.optim.Optimizer, adapter,
                 names: dict[Tensor, str]):
        self.cb, self.optimizer, self.adapter = cb, optimizer, adapter
        self.entries: list[tuple[str, Tensor, dict, Tensor]] = []  # name, param, group, sampled idx
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if not p.requires_grad:
                    continue
                name = names.get(p, f"group{gi}.param{pi}")
                if cb.include and not any(fnmatch.fnmatch(name, pat) for pat in cb.include):
                    continue
                self.entries.append((name, p, group, None))
        if cb.max_tensors is not None and len(self.entries) > cb.max_tensors:
            # evenly spaced in parameter order, so that the sample spans the depth of the model
            n, m = len(self.entries), cb.max_tensors
            keep = sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)})
            rank_zero_info(f"MomentCorrelation: tracking {len(keep)} of {n} parameter tensors "
                           f"(max_tensors={m}; choose others with include=[...])")
            self.entries = [self.entries[i] for i in keep]
        self.entries = [(name, p, group, _sample_indices(p.numel(), cb.num_coords, cb.seed, name).to(p.device))
                        for name, p, group, _ in self.entries]
        self.names = [e[0] for e in self.entries]
        device = self.entries[0][1].device if self.entries else torch.device("cpu")
        counts = [int(e[3].numel()) for e in self.entries]
        self.counts = counts
        self.num = sum(counts)
        self.segment = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long)
                                               ).to(device) if counts else torch.zeros(0, dtype=torch.long)
        # spatial partner j of each sampled i: a random cyclic derangement inside each tensor's sample
        gen = torch.Generator().manual_seed(cb.seed + 7)
        partner, start = [], 0
        for c in counts:
            order = torch.randperm(c, generator=gen)
            part = torch.empty(c, dtype=torch.long)
            part[order] = order.roll(1)  # i -> the next in a random cycle (itself only when c == 1)
            partner.append(part + start)
            start += c
        self.partner = (torch.cat(partner) if partner else torch.zeros(0, dtype=torch.long)).to(device)
        self.lags = list(cb.lags)
        self.max_lag = max(self.lags) if self.lags else 0
        # X rows: g^2, |g|, g.  Y rows: v, step, g_{t-lag}[i] (per lag), g_{t-lag}[j] (per lag).
        pair_x = [0, 1] + [2] * (2 * len(self.lags))
        self.moments = _CoMoments(3, pair_x, self.num, device, cb.window)
        self.device = device
        self.step = 0                       # optimizer steps seen by the hook
        self.ring: dict[int, Tensor] = {}   # step -> normalised g sample (for the lags)
        self.scale: Tensor | None = None    # per-coordinate (g, v, step) scales, fixed per tensor ...
        self.scaled = torch.zeros(3, len(counts), dtype=torch.bool)  # ... at its first finite sample
        self.v_rec: Tensor | None = None    # paper protocol: recomputed v (un-bias-corrected) ...
        self.v_rec_max: Tensor | None = None
        self.v_rec_count: Tensor | None = None  # ... and its number of updates, per coordinate
        self.ema_prev: Tensor | None = None  # the optimizer's own v at the previous step (innovations)
        self.frozen: list[Tensor] | None = None
        self._vidx: dict[tuple[int, tuple], Tensor] = {}
        self.handle = optimizer.register_step_post_hook(self._hook) if self.entries else None

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # -- sampling ----------------------------------------------------------------------------------
    def _gather(self, which: str) -> Tensor:
        """The sampled coordinates of g ('g'), v ('v') or the optimizer's EMA ('ema'), float32; NaN for
        a tensor without one: no grad at this step (unused by the loss: its v is stale, so it is no
        sample at all), or no v yet."""
        out = []
        for k, (name, p, group, idx) in enumerate(self.entries):
            if which == "g":
                g = p.grad
                out.append(torch.full((idx.numel(),), math.nan, device=self.device) if g is None
                           else torch.take(g.detach(), idx).float())  # take: flat index, any layout
                continue
            state = self.optimizer.state.get(p, {})
            if not state or not self.adapter.ready(state, group):
                out.append(torch.full((idx.numel(),), math.nan, device=self.device))
                continue
            if p.grad is None:  # not stepped now: no sample (the g gather is NaN too)
                out.append(torch.full((idx.numel(),), math.nan, device=self.device))
                continue
            t = (self.adapter.v if which == "v" else self.adapter.ema)(state, group, p.grad)
            key = (k, tuple(t.shape))
            if key not in self._vidx:
                self._vidx[key] = _block_index(idx.cpu(), p.shape, t.shape).to(self.device)
            out.append(torch.take(t.detach(), self._vidx[key]).float())
        return torch.cat(out)

    def _per_coord(self, values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32).repeat_interleave(
            torch.tensor(self.counts, dtype=torch.long)).to(self.device)

    def _group_scalars(self) -> tuple[Tensor | float, Tensor | float, Tensor | float]:
        """lr, 1 / (1 - beta2^k) (v's bias correction) and eps: Python numbers when every tracked tensor
        shares them (the usual case: one group, one step count), else per sampled coordinate."""
        rows = []
        for name, p, group, idx in self.entries:
            state = self.optimizer.state.get(p, {})
            ready = bool(state) and self.adapter.ready(state, group)  # else no v: the coordinates are skipped
            bc = 1.0 - group["betas"][1] ** self.adapter.count(state, group) if ready and self.adapter.bias_corrected \
                else 1.0
            rows.append((float(group["lr"]), 1.0 / bc, float(group.get("eps", 1e-8))))
        if all(r == rows[0] for r in rows):
            return rows[0]
        per = torch.tensor(rows, dtype=torch.float32).t().repeat_interleave(
            torch.tensor(self.counts, dtype=torch.long), dim=1).to(self.device)
        return per[0], per[1], per[2]

    # -- the hook ----------------------------------------------------------------------------------
    def _hook(self, optimizer, args, kwargs) -> None:
        # Everything read here is detached (grads, optimizer state), so no autograd graph is built; the
        # common "nothing to do at this step" path costs a few integer operations.
        cb = self.cb
        self.step += 1
        t = self.step
        if cb.freeze_after_step is not None and t > cb.freeze_after_step and self.frozen is not None:
            with torch.no_grad():
                for p, saved in zip(self._all_params(), self.frozen):
                    p.copy_(saved)  # the paper's protocol: gradients sampled at one fixed point
        if cb.freeze_after_step is not None and t == cb.freeze_after_step:
            # every parameter of the optimizer, tracked or not: if the other layers moved, the tracked
            # tensor's gradients would not be samples at one point
            self.frozen = [p.detach().clone() for p in self._all_params()]
            self.moments.reset()  # the measurement window starts now ...
            self.ring.clear()  # ... and lagged pairs use only gradients taken at the fixed point (t > freeze)
        paper = cb.protocol == "paper"
        k = cb.every_n_steps
        sample_now = t % k == 0 and t >= cb.start_step and (
            cb.freeze_after_step is None or t > cb.freeze_after_step)
        need_g = paper or sample_now or any((t + lag) % k == 0 for lag in self.lags)
        if not need_g:
            return
        g = self._gather("g")
        if self.scale is None:
            self.scale = torch.ones(3, self.num, device=self.device)
        self._fix_scales(0, g)
        g = g / self.scale[0]
        if self.lags and (cb.freeze_after_step is None or t != cb.freeze_after_step):
            self.ring[t] = g
            for old in [s for s in self.ring if s < t - self.max_lag]:
                del self.ring[old]
        if not (sample_now or paper):
            return
        v = self._gather("v")
        present = torch.isfinite(g) & torch.isfinite(v)  # per coordinate: a gradient and its v now
        if paper:
            self._recompute_v(g, present)
        if not sample_now:
            return
        if any((t - lag) not in self.ring for lag in self.lags):
            return  # not enough history yet for every lag
        lr, inv_bc, eps = self._group_scalars()
        if paper:
            if self.v_rec is None:
                return
            b2 = cb.protocol_beta2
            v_used = self.v_rec_max if self.v_rec_max is not None else self.v_rec
            v_hat = v_used / (1.0 - b2 ** self.v_rec_count)  # NaN where no update yet: skipped below
        else:
            v_hat = v * inv_bc
        # v_rec / v are not normalised: lr/(sqrt(v_hat)+eps) needs the real value
        step_size = lr / (v_hat.sqrt() + eps)
        self._fix_scales(1, v_hat)
        self._fix_scales(2, step_size)
        v_hat = v_hat / self.scale[1]
        step_size = step_size / self.scale[2]
        x = torch.stack([g * g, g.abs(), g])  # Pearson is invariant to the per-tensor scales
        rows = [v_hat, step_size]
        if self.lags:
            lagged = torch.stack([self.ring[t - lag] for lag in self.lags])
            rows_y = torch.cat([torch.stack(rows), lagged, lagged.index_select(1, self.partner)])
        else:
            rows_y = torch.stack(rows)
        # A coordinate is sampled only with all of it: g_t and v_t now and g at every lag. A tensor the
        # loss did not use at one of those steps (grad None) is skipped, not recorded as g = 0.
        valid = present & torch.isfinite(rows_y).all(0) & torch.isfinite(x).all(0)
        self.moments.update(x, rows_y, weight_steps=k, valid=valid)

    def _segment_mean(self, x: Tensor) -> list[float]:
        """Per tensor, the mean of x's finite values (NaN for a tensor with none)."""
        finite = torch.isfinite(x)
        zeros = torch.zeros(len(self.counts), device=x.device)
        sums = zeros.index_add(0, self.segment, torch.where(finite, x, 0.0))
        counts = zeros.index_add(0, self.segment, finite.float())
        return (sums / counts).tolist()

    def _fix_scales(self, row: int, x: Tensor) -> None:
        """Fix row ``row`` (g, v, step) of the per-tensor scales at each tensor's first finite sample of
        x. Fixed scales keep float32 co-moments far from underflow; they never change afterwards (the
        co-moments hold scaled values), and Pearson does not depend on them."""
        if bool(self.scaled[row].all()):
            return
        for ti, m in enumerate(self._segment_mean(x.abs())):
            if not self.scaled[row, ti] and math.isfinite(m):
                self.scale[row, self.segment == ti] = m if m > 0 else 1.0
                self.scaled[row, ti] = True

    def _recompute_v(self, g_normalised: Tensor, present: Tensor) -> None:
        """paper protocol: v_rec = b2 v_rec + (1 - b2) u_t with u_t the input of the optimizer's own
        v recurrence (g_t^2 for Adam-type; (v_t - beta2 v_{t-1}) / (1 - beta2) otherwise), at the
        coordinates ``present`` (with a gradient and a v at this step); the others keep theirs."""
        b2 = self.cb.protocol_beta2
        if self.adapter.elementwise_innovation:
            g = g_normalised * self.scale[0]
            u = g * g
        else:
            ema = self._gather("ema")
            # v's value before its first innovation, for coordinates with no earlier sample (NaN in
            # ema_prev: no v yet, e.g. ADOPT's first step, which only sets v_1 = g_1^2)
            start = ema if self.adapter.first_v_is_sample else torch.zeros_like(ema)
            prev = start if self.ema_prev is None else torch.where(torch.isnan(self.ema_prev), start, self.ema_prev)
            beta2 = self._per_coord([e[2]["betas"][1] for e in self.entries])
            u = (ema - beta2 * prev) / (1.0 - beta2)
            self.ema_prev = torch.where(present, ema, prev)
        if self.v_rec is None:
            self.v_rec, self.v_rec_count = torch.zeros_like(u), torch.zeros_like(u)
        self.v_rec = torch.where(present, b2 * self.v_rec + (1.0 - b2) * u, self.v_rec)
        self.v_rec_count += present
        if any(self.adapter.running_max(e[2]) for e in self.entries):
            self.v_rec_max = (torch.where(present, self.v_rec, 0.0) if self.v_rec_max is None
                              else torch.where(present, torch.maximum(self.v_rec_max, self.v_rec), self.v_rec_max))

    # -- results -----------------------------------------------------------------------------------
    def metric_names(self) -> list[str]:
        return (["g2_v", "absg_step"] + [f"temporal_lag{lag}" for lag in self.lags]
                + [f"spatial_lag{lag}" for lag in self.lags])

    def sums(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per metric and tensor: sum of the valid per-coordinate r, of r^2, and their count ((P, T) each)."""
        r, valid = self.moments.pearson()
        num_t = len(self.counts)
        out = [torch.zeros(r.shape[0], num_t, device=r.device, dtype=torch.float64).index_add_(
            1, self.segment, z.double()) for z in (r, r * r, valid.float())]
        return tuple(o.cpu() for o in out)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def state_dict(self) -> dict:
        return {"names": self.names, "counts": self.counts, "step": self.step,
                "moments": self.moments.state_dict(),
                "ring_steps": list(self.ring.keys()),
                "ring": torch.stack(list(self.ring.values())).cpu() if self.ring else torch.zeros(0),
                "scale": None if self.scale is None else self.scale.cpu(), "scaled": self.scaled.clone(),
                "v_rec": None if self.v_rec is None else self.v_rec.cpu(),
                "v_rec_max": None if self.v_rec_max is None else self.v_rec_max.cpu(),
                "v_rec_count": None if self.v_rec_count is None else self.v_rec_count.cpu(),
                "ema_prev": None if self.ema_prev is None else self.ema_prev.cpu()}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["names"]) != self.names or list(sd["counts"]) != self.counts:
            rank_zero_info("MomentCorrelation: the saved state tracks other tensors; starting afresh")
            return
        dev = self.device
        self.step = int(sd["step"])
        self.moments.load_state_dict({k: (v.to(dev) if isinstance(v, Tensor) else v)
                                      for k, v in sd["moments"].items()})
        self.ring = {int(s): sd["ring"][i].to(dev) for i, s in enumerate(sd["ring_steps"])}
        opt = lambda key: None if sd.get(key) is None else sd[key].to(dev)  # noqa: E731
        self.scale, self.v_rec, self.v_rec_max, self.ema_prev = (opt("scale"), opt("v_rec"), opt("v_rec_max"),
                                                                 opt("ema_prev"))
        count = sd.get("v_rec_count")
        self.v_rec_count = (None if self.v_rec is None else  # a plain int before per-coordinate counts
                            torch.as_tensor(count, dtype=torch.float32).expand_as(self.v_rec).clone().to(dev))
        if "scaled" in sd:
            self.scaled = sd["scaled"].clone()
        else:  # before per-tensor flags: g's scale fixed with the first sample, v's and the step's together
            self.scaled[0] = self.scale is not None
            self.scaled[1:] = bool(sd.get("scaled_v", False))
        if self.cb.freeze_after_step is not None and self.step >= self.cb.freeze_after_step:
            # frozen parameters do not move, so the restored ones are the fixed point
            self.frozen = [p.detach().clone() for p in self._all_params()]


# --------------------------------------------------------------------------------------------------
# The callback.
# --------------------------------------------------------------------------------------------------
class MomentCorrelation(Callback):
    """Measures corr(g_t^2, v_t), corr(|g_t|, lr/(sqrt(v_t)+eps)) and the temporal/spatial gradient
    correlations of Appendix C, per parameter tensor and overall, while training.

    Args:
        every_n_steps: update the co-moments every n optimizer steps (1: every step).
        log_every_n_steps: write to TensorBoard (``corr/...``) and ``correlation.csv`` every n global steps.
        num_coords: K, the coordinates sampled per tensor (all of them when the tensor is smaller).
        window: horizon of the exponentially weighted co-moments in optimizer steps; None = all samples
            since the measurement started (the paper's protocol).
        lags: the n of corr(g_t, g_{t-n}) (temporal) and corr(g_t[i], g_{t-n}[j]) (spatial).
        seed: fixes the sampled coordinates (identical on every DDP rank).
        protocol: "live" (the optimizer's own v_t) or "paper" (v recomputed with ``protocol_beta2``).
        protocol_beta2: the fixed beta2 of the paper protocol. Appendix C does not state one; 0.9 is
            inferred from its Adam value 0.436 = sqrt(1 - 0.9^2).
        freeze_after_step: paper protocol option (ours, not the paper's): after this many optimizer
            steps the parameters are held fixed (the optimizer's update is undone after every step)
            and measuring starts.
        start_step: first optimizer step whose sample enters the co-moments.
        include: fnmatch patterns of parameter names to track (None: every parameter).
        max_tensors: track at most this many tensors (evenly spaced in parameter order; None: no limit).
            The cost per sample grows with the number of tensors, not with their size.
        filename: the CSV written into the run directory (None: no file).
    """

    def __init__(self, every_n_steps: int = 10, log_every_n_steps: int = 50, num_coords: int = 256,
                 window: int | None = 2000, lags: Iterable[int] = (1, 2, 5, 10), seed: int = 0,
                 protocol: str = "live", protocol_beta2: float = 0.9, freeze_after_step: int | None = None,
                 start_step: int = 0, include: Iterable[str] | None = None, max_tensors: int | None = 16,
                 filename: str | None = "correlation.csv") -> None:
        for key, val in (("every_n_steps", every_n_steps), ("log_every_n_steps", log_every_n_steps),
                         ("num_coords", num_coords)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"Invalid {key} value: {val!r} (allowed: an integer >= 1)")
        if window is not None and not (isinstance(window, (int, float)) and window >= 1):
            raise ValueError(f"Invalid window value: {window!r} (allowed: a number of steps >= 1, or null)")
        lags = tuple(int(lag) for lag in (lags or ()))
        if any(lag < 1 for lag in lags):
            raise ValueError(f"Invalid lags value: {lags!r} (allowed: integers >= 1)")
        if protocol not in PROTOCOLS:
            raise ValueError(f"Invalid protocol value: {protocol!r} (allowed: {', '.join(PROTOCOLS)})")
        if not 0.0 <= protocol_beta2 < 1.0:
            raise ValueError(f"Invalid protocol_beta2 value: {protocol_beta2!r} (allowed: 0 <= beta2 < 1)")
        if freeze_after_step is not None and (protocol != "paper" or freeze_after_step < 1):
            raise ValueError(f"Invalid freeze_after_step value: {freeze_after_step!r} "
                             "(allowed: an integer >= 1 with protocol='paper', or null)")
        self.every_n_steps, self.log_every_n_steps = every_n_steps, log_every_n_steps
        self.num_coords, self.window, self.lags, self.seed = num_coords, window, lags, int(seed)
        self.protocol, self.protocol_beta2 = protocol, float(protocol_beta2)
        self.freeze_after_step, self.start_step = freeze_after_step, int(start_step)
        self.include = list(include) if include else None
        if max_tensors is not None and (not isinstance(max_tensors, int) or max_tensors < 1):
            raise ValueError(f"Invalid max_tensors value: {max_tensors!r} (allowed: an integer >= 1, or null)")
        self.max_tensors = max_tensors
        self.filename = filename
        self.trackers: list[_Tracker] = []
        self.skipped: list[str] = []
        self._pending: dict | None = None
        self._csv_path: str | None = None
        self._last_logged = -1
        self._final: dict | None = None

    # -- core (usable without a Trainer) ---------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, names: dict[Tensor, str] | None = None) -> bool:
        """Start measuring ``optimizer`` (names: parameter -> name). False (and one info line) when its
        family keeps no second moment."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the real one
        adapter = adapter_for(optimizer)
        if adapter is None:
            msg = (f"MomentCorrelation: {type(optimizer).__name__} keeps no second moment v_t; "
                   "no g_t-v_t correlation for it")
            rank_zero_info(msg)
            self.skipped.append(type(optimizer).__name__)
            return False
        tracker = _Tracker(self, optimizer, adapter, names or {})
        if not tracker.entries:
            rank_zero_info(f"MomentCorrelation: no parameter of {type(optimizer).__name__} matches include="
                           f"{self.include}; nothing measured for it")
        if self._pending is not None and len(self.trackers) < len(self._pending["trackers"]):
            tracker.load_state_dict(self._pending["trackers"][len(self.trackers)])
        self.trackers.append(tracker)
        return True

    def detach(self) -> None:
        for tr in self.trackers:
            tr.remove()

    def compute(self) -> dict[str, Any]:
        """The current estimates: {"overall": {metric: r}, "se": {metric: standard error of the overall
        r}, "tensors": {name: {metric: r}}, "coords": {name: coordinates averaged}, "samples": n}.

        r is the mean over sampled coordinates of the per-coordinate Pearson; ``se`` is the spread of the
        per-coordinate values / sqrt(coordinates) -- exact for independent coordinates, a lower bound when
        coordinates share noise."""
        out: dict[str, Any] = {"overall": {}, "se": {}, "tensors": {}, "coords": {}, "samples": 0}
        totals: dict[str, list[float]] = {}
        for tr in self.trackers:
            s, s2, c = tr.sums()
            out["samples"] = max(out["samples"], int(tr.moments.n.max()) if tr.num else 0)
            for mi, metric in enumerate(tr.metric_names()):
                tot = totals.setdefault(metric, [0.0, 0.0, 0.0])
                tot[0] += float(s[mi].sum())
                tot[1] += float(s2[mi].sum())
                tot[2] += float(c[mi].sum())
                for ti, name in enumerate(tr.names):
                    cnt = float(c[mi, ti])
                    out["tensors"].setdefault(name, {})[metric] = float(s[mi, ti]) / cnt if cnt else None
                    if metric == "g2_v":
                        out["coords"][name] = int(cnt)
        for m, (s1, s2, n) in totals.items():
            out["overall"][m] = s1 / n if n else None
            out["se"][m] = math.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0) / (n - 1)) if n > 1 else None
        return out

    def protocol_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.protocol, "window": self.window, "num_coords": self.num_coords,
                                "max_tensors": self.max_tensors, "include": self.include,
                                "every_n_steps": self.every_n_steps, "lags": list(self.lags), "seed": self.seed}
        if self.protocol == "paper":
            info.update(beta2=self.protocol_beta2, freeze_after_step=self.freeze_after_step)
        else:
            info["beta2"] = "optimizer's own"
        return info

    def summary(self) -> dict[str, Any] | None:
        """The final averages (for summary.json["correlation"]) with the protocol that produced them."""
        if not self.trackers:
            return {"protocol": self.protocol_info(), "skipped": self.skipped,
                    "note": "no optimizer with a second moment v_t"} if self.skipped else None
        res = self._final if self._final is not None else self.compute()
        return {"protocol": self.protocol_info(), "optimizer_steps": max(tr.step for tr in self.trackers),
                **res, "skipped": self.skipped}

    # -- Lightning hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self.detach()
        self.trackers, self.skipped, self._final = [], [], None
        names = {p: n for n, p in pl_module.named_parameters()}
        for opt in trainer.optimizers:
            self.attach(opt, names)
        self._pending = None
        log_dir = trainer.log_dir if trainer.loggers else None  # logger=False: no files either
        if self.filename and log_dir and trainer.is_global_zero:
            os.makedirs(log_dir, exist_ok=True)
            self._csv_path = os.path.join(log_dir, self.filename)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_logged or step % self.log_every_n_steps != 0:
            return
        self._log(trainer, step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.trackers:
            self._final = self.compute()
            if trainer.global_step != self._last_logged:
                self._log(trainer, trainer.global_step, result=self._final)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.detach()

    def _log(self, trainer, step: int, result: dict | None = None) -> None:
        self._last_logged = step
        if not self.trackers or not trainer.is_global_zero:
            return
        res = result or self.compute()
        if res["samples"] == 0:
            return
        metrics = {f"corr/{m}/overall": v for m, v in res["overall"].items() if v is not None}
        for name, vals in res["tensors"].items():
            for m in ("g2_v", "absg_step") + tuple(f"temporal_lag{lag}" for lag in self.lags[:1]):
                if vals.get(m) is not None:
                    metrics[f"corr/{m}/{name}"] = vals[m]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self._csv_path:
            self._write_csv(step, res)

    def _write_csv(self, step: int, res: dict) -> None:
        cols = ["step", "protocol", "tensor", "coords", "samples"] + list(self.trackers[0].metric_names())
        new = not os.path.exists(self._csv_path)
        with open(self._csv_path, "a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(cols)
            rows = [("overall", sum(res["coords"].values()), res["overall"])]
            rows += [(n, res["coords"].get(n, 0), vals) for n, vals in res["tensors"].items()]
            for name, coords, vals in rows:
                w.writerow([step, self.protocol, name, coords, res["samples"]]
                           + ["" if vals.get(m) is None else f"{vals[m]:.6g}" for m in cols[5:]])

    # -- checkpointing -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.trackers:
            return dict(self._pending) if self._pending else {}
        return {"version": 1, "protocol": self.protocol, "trackers": [tr.state_dict() for tr in self.trackers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or "trackers" not in state_dict:
            return
        if state_dict.get("protocol") != self.protocol:
            rank_zero_info(f"MomentCorrelation: checkpoint measured protocol {state_dict.get('protocol')!r}, "
                           f"this run {self.protocol!r}; starting afresh")
            return
        self._pending = state_dict  # applied when on_fit_start attaches (Lightning restores callbacks first)
        for tr, sd in zip((tr for tr in self.trackers if tr.handle is not None), state_dict["trackers"]):
            tr.load_state_dict(sd)  # already measuring (used without a Trainer): apply now
