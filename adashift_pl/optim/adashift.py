r"""AdaShift: decorrelated adaptive learning rates by temporal shifting (ICLR 2019).

Algorithm 2 of the paper (Appendix B) with the first-moment window of Eq. 44
(Appendix I.4). For one block (here: one parameter tensor, or one row of it) at
time t, counting every gradient the optimizer has seen:

.. math::
    m_t = \frac{\sum_{i=0}^{m-1} \beta_1^i g_{t-i}}{\sum_{i=0}^{m-1} \beta_1^i}, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, \phi(g_{t-n}^2), \qquad
    \theta_t = \theta_{t-1} - \alpha_t \frac{m_t}{\sqrt{v_t / (1 - \beta_2^k)} + \epsilon}

with n = ``keep_num`` (the temporal shift), m = ``window`` (1 <= m <= n), k the
number of updates done so far, and phi = ``spatial_op``. While t <= n the
gradient is only queued and the parameter does not move: v_t must be built from
a gradient that m_t does not contain (g_{t-n} lies outside m_t's window exactly
when m <= n), which is what decorrelates the step size from the current gradient
(Section 4, Theorem 5).

Variants (Appendix J):

* ``spatial_op="max"`` -- max-AdaShift, the paper's default: one scalar v per block.
* ``spatial_op="mean"`` -- the mean of g^2 over the block instead of its max.
* ``spatial_op="none"`` -- non-AdaShift, "temporal-only": v is element-wise.
* :class:`AdaShiftSpatial` -- "spatial-only": phi over the *current* gradient, no
  shift (Adam with a block-shared v).

A block is one parameter tensor (``spatial_block="tensor"``, the paper's choice) or
one slice along the first dimension (``spatial_block="row"``: one v per output
unit/channel; tensors with fewer than 2 dims are one block).

Cost and memory. The first-moment numerator is kept as a running sum
S_t = beta1 * S_{t-1} + g_t - beta1^m * g_{t-m}, so a step costs O(1) in n and m;
it is recomputed exactly from the history every ``_RESYNC_EVERY`` steps so that
float32 rounding cannot drift (beta1 = 1 makes S a plain sum). State per parameter,
in parameter-sized buffers:

* phi = max/mean: m (gradient history for the window) + 1 (S); the n values of
  phi(g^2) that v still needs are block scalars, not whole gradients.
* phi = none: n (the element-wise v needs g_{t-n} itself) + 1 (S).
* AdaShiftSpatial: 1 (Adam's first moment); v is one scalar per block.

Weight decay is decoupled (AdamW-style, theta <- theta (1 - lr * wd)) and applied
only on steps that update. L2-in-the-gradient would enter v through g_{t-n}^2 and,
with a block max, the decay of every element would be rescaled by the largest
gradient of its block -- decoupling keeps the decay independent of the adaptive
scale.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from adashift_pl.optim import _fast

__all__ = ["AdaShift", "AdaShiftSpatial", "adashift", "SPATIAL_OPS", "SPATIAL_BLOCKS"]

SPATIAL_OPS = ("max", "mean", "none")
SPATIAL_BLOCKS = ("tensor", "row")
# Recompute the running first-moment sum exactly from the history this often.
_RESYNC_EVERY = 1000


def _is_real(x) -> bool:
    """A real number (a 1-element tensor counts; a bool or a string does not)."""
    if isinstance(x, Tensor):
        return x.numel() == 1 and not x.is_complex()
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_common(lr, betas, eps, weight_decay, spatial_op, spatial_block, beta1_may_be_one, maximize=False):
    if not (_is_real(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr!r} (allowed: lr >= 0)")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) for b in betas)):
        raise ValueError(f"Invalid betas: {betas!r} (allowed: a pair of numbers (beta1, beta2))")
    if not _is_real(eps):
        raise ValueError(f"Invalid epsilon value: {eps!r} (allowed: a number eps >= 0)")
    if not _is_real(weight_decay):
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (allowed: a number weight_decay >= 0)")
    if not isinstance(maximize, bool):
        raise ValueError(f"Invalid maximize value: {maximize!r} (allowed: True, False)")
    # AdaShift's window average allows beta1 = 1 (a plain mean, Eq. 17); an EMA does not.
    if not (0.0 <= betas[0] <= 1.0 if beta1_may_be_one else 0.0 <= betas[0] < 1.0):
        allowed = "0 <= beta1 <= 1" if beta1_may_be_one else "0 <= beta1 < 1"
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]} (allowed: {allowed})")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]} (allowed: 0 <= beta2 < 1)")
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps} (allowed: eps >= 0)")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (allowed: weight_decay >= 0)")
    if spatial_op not in SPATIAL_OPS:
        raise ValueError(f"Invalid spatial_op: {spatial_op!r} (allowed: {', '.join(SPATIAL_OPS)})")
    if spatial_block not in SPATIAL_BLOCKS:
        raise ValueError(f"Invalid spatial_block: {spatial_block!r} (allowed: {', '.join(SPATIAL_BLOCKS)})")


def block_reduce(x: Tensor, spatial_op: str, spatial_block: str) -> Tensor:
    """phi over each block of ``x`` (= g^2): a 0-d tensor per tensor, or (rows, 1, ...)."""
    if spatial_op == "none":
        return x
    if spatial_block == "row" and x.dim() >= 2:
        dims = tuple(range(1, x.dim()))
        return x.amax(dim=dims, keepdim=True) if spatial_op == "max" else x.mean(dim=dims, keepdim=True)
    return x.max() if spatial_op == "max" else x.mean()


def _run_closure(closure: Callable[[], float] | None):
    """torch.optim's contract: the closure re-evaluates the loss under grad; its loss is step()'s result."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _sparse_error(name: str) -> RuntimeError:
    return RuntimeError(f"{name} does not support sparse gradients; use torch.optim.SparseAdam instead")


class AdaShift(Optimizer):
    """AdaShift (Algorithm 2 + Eq. 44). See the module docstring for the maths.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate alpha (default 1e-2: max-AdaShift's best lr is about 10x
            Adam's, Appendix I.2).
        betas: (beta1, beta2). beta1 in [0, 1] weights the window (1 = plain
            average); beta2 in [0, 1) is v's decay.
        keep_num: n >= 1, the temporal shift: v_t uses g_{t-n}.
        window: m in [1, keep_num], the number of latest gradients averaged into
            m_t (default: keep_num).
        spatial_op: phi over a block: "max" (default), "mean" or "none".
        spatial_block: "tensor" (one block per parameter tensor, the paper's) or
            "row" (one block per slice along dim 0).
        eps: added to sqrt(v_hat) (default 1e-10, as in the authors' code).
        weight_decay: decoupled weight decay (see module docstring).
        maximize: maximize the objective instead of minimizing.
        foreach: which implementation runs the steady-state steps (t > n). None (default):
            the fast path where it is faster -- on CPU the fused C kernel of
            :mod:`adashift_pl.optim._fast` (one pass over p, g, S and one history slot, about
            fused Adam's speed; built once per machine with the system C compiler), on CUDA
            torch._foreach_* ops -- else this per-parameter reference code. True: the fast
            path, with foreach ops where the kernel is unavailable. False: always the
            reference code. All paths share one state layout and follow the same trajectory
            (tests/test_adashift_fast.py).

    State per parameter: ``step`` (gradients seen), ``updates`` (k), ``history``
    (ring buffer of the last m -- or n for phi = none -- gradients), ``exp_avg_sum``
    (the running window sum S), ``phi_history`` (the last n block values of
    phi(g^2), phi = max/mean only) and ``exp_avg_sq`` (v_t at block resolution).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        keep_num: int = 10,
        window: int | None = None,
        spatial_op: str = "max",
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        maximize: bool = False,
        spatial_block: str = "tensor",
        foreach: bool | None = None,
    ):
        _check_common(lr, betas, eps, weight_decay, spatial_op, spatial_block, beta1_may_be_one=True, maximize=maximize)
        _check_window(keep_num, window)
        if foreach not in (None, True, False):
            raise ValueError(f"Invalid foreach value: {foreach!r} (allowed: None, True, False)")
        defaults = dict(lr=lr, betas=tuple(betas), keep_num=keep_num, window=window, spatial_op=spatial_op,
                        spatial_block=spatial_block, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # Per-group hyper-parameters get the same checks as the constructor's.
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        g["betas"] = tuple(g["betas"])
        _check_common(g["lr"], g["betas"], g["eps"], g["weight_decay"], g["spatial_op"], g["spatial_block"], True,
                      g["maximize"])
        _check_window(g["keep_num"], g["window"])

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("spatial_block", "tensor")
            group.setdefault("maximize", False)
            group.setdefault("window", None)
            group.setdefault("foreach", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One optimizer step; runs ``closure`` under grad first and returns its loss."""
        loss = _run_closure(closure)
        for group in self.param_groups:
            hyper = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                         keep_num=group["keep_num"], window=group["window"] or group["keep_num"],
                         spatial_op=group["spatial_op"], spatial_block=group["spatial_block"],
                         eps=group["eps"], weight_decay=group["weight_decay"], maximize=group["maximize"])
            batches: dict[tuple, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise _sparse_error("AdaShift")
                state = self.state[p]
                if len(state) == 0:
                    _init_state(state, p, group)
                path = _fast_path(group.get("foreach"), p, state, hyper) if group.get("foreach") is not False else None
                if path is None:
                    adashift(p, p.grad, state, **hyper)
                else:
                    batch = batches.setdefault((path, p.device, p.dtype), ([], [], []))
                    batch[0].append(p)
                    batch[1].append(p.grad)
                    batch[2].append(state)
            for (path, _, _), (params, grads, states) in batches.items():
                if path == "kernel":
                    _fast.run_kernel(params, grads, states, **{k: v for k, v in hyper.items() if k != "spatial_block"})
                else:
                    _fast.run_foreach(params, grads, states, **hyper)
        return loss


def _fast_path(foreach: bool | None, p: Tensor, state: dict, hyper: dict) -> str | None:
    """Which fast implementation takes this parameter's step now: "kernel", "foreach" or None (the
    reference per-parameter function). Only the steady state goes fast: t > n, not a resync step,
    dense row-major tensors of the parameter's dtype and device."""
    t = state["step"] + 1
    n = hyper["keep_num"]
    if t <= n or t % _RESYNC_EVERY == 0:
        return None
    g, s, h = p.grad, state["exp_avg_sum"], state["history"]
    dtype = p.dtype
    if (g.dtype != dtype or s.dtype != dtype or h.dtype != dtype or g.device != p.device
            or h.shape[0] != (n if hyper["spatial_op"] == "none" else hyper["window"])
            or not (p.is_contiguous() and g.is_contiguous() and s.is_contiguous() and h.is_contiguous())
            or p.numel() == 0):
        return None
    if p.device.type == "cpu":
        # one fused pass: as fast as fused Adam (benchmarks/optimizer_step.py); without a C compiler,
        # torch's foreach ops are loops of ordinary ops on CPU, no faster than the reference path
        if dtype in _fast.KERNEL_DTYPES and _fast.kernel_available():
            return "kernel"
        return "foreach" if foreach else None
    return "foreach" if foreach or p.device.type == "cuda" else None


def _check_window(keep_num, window) -> None:
    if isinstance(keep_num, bool) or not isinstance(keep_num, int) or keep_num < 1:
        raise ValueError(f"Invalid keep_num value: {keep_num!r} (allowed: an integer n >= 1)")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or not 1 <= window <= keep_num):
        raise ValueError(f"Invalid window value: {window!r} (allowed: an integer m with 1 <= m <= keep_num={keep_num})")


def _init_state(state: dict, p: Tensor, group: dict) -> None:
    n = group["keep_num"]
    m = group["window"] or n
    elementwise = group["spatial_op"] == "none"
    slots = n if elementwise else m
    state["step"] = 0
    state["updates"] = 0
    state["history"] = torch.zeros((slots, *p.shape), dtype=p.dtype, device=p.device)
    state["exp_avg_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    block = block_reduce(torch.zeros_like(p), group["spatial_op"], group["spatial_block"])
    if not elementwise:
        state["phi_history"] = torch.zeros((n, *block.shape), dtype=p.dtype, device=p.device)
    state["exp_avg_sq"] = torch.zeros_like(block)


def adashift(param: Tensor, grad: Tensor, state: dict, *, lr: float, beta1: float, beta2: float,
             keep_num: int, window: int, spatial_op: str, spatial_block: str, eps: float,
             weight_decay: float, maximize: bool) -> None:
    """The functional AdaShift update of one parameter (in place on ``param`` and ``state``)."""
    n, m = keep_num, window
    g = -grad if maximize else grad
    history = state["history"]
    slots = history.shape[0]
    if slots != (n if spatial_op == "none" else m):
        raise RuntimeError(
            f"AdaShift state holds {slots} history slots but keep_num={n}, window={m}, spatial_op={spatial_op!r} "
            "need a different number: keep_num/window/spatial_op cannot change once a parameter has state")
    t = state["step"] + 1  # index of the gradient being pushed (1-based)
    state["step"] = t

    # g_{t-n}, needed by v, is read before its slot is overwritten.
    if t > n:
        if spatial_op == "none":
            oldest = history[(t - 1 - n) % slots]
            phi_old = oldest * oldest
        else:
            phi_old = state["phi_history"][(t - 1 - n) % n].clone()

    # Running window sum S_t = beta1 S_{t-1} + g_t - beta1^m g_{t-m}.
    s = state["exp_avg_sum"]
    if t % _RESYNC_EVERY == 0:
        history[(t - 1) % slots].copy_(g)
        s.copy_(_window_sum(history, t, m, beta1))
    else:
        s.mul_(beta1).add_(g)
        if t > m:
            s.sub_(history[(t - 1 - m) % slots], alpha=beta1 ** m)
        history[(t - 1) % slots].copy_(g)
    if spatial_op != "none":
        state["phi_history"][(t - 1) % n].copy_(block_reduce(g * g, spatial_op, spatial_block))

    if t <= n:
        return  # the queue is still filling: no update (Algorithm 2, line 5-6)

    k = state["updates"] + 1
    state["updates"] = k
    v = state["exp_avg_sq"]
    v.mul_(beta2).add_(phi_old, alpha=1 - beta2)
    weight_sum = float(m) if beta1 == 1.0 else (1 - beta1 ** m) / (1 - beta1)
    denom = (v / (1 - beta2 ** k)).sqrt_().add_(eps)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.addcdiv_(s, denom * weight_sum, value=-lr)


def _window_sum(history: Tensor, t: int, m: int, beta1: float) -> Tensor:
    """Exact sum_{i<min(m,t)} beta1^i g_{t-i} from the ring buffer (after g_t was pushed)."""
    slots = history.shape[0]
    total = torch.zeros_like(history[0])
    for i in range(min(m, t)):
        total.add_(history[(t - 1 - i) % slots], alpha=beta1 ** i)
    return total


class AdaShiftSpatial(Optimizer):
    """AdaShift (spatial-only), Appendix J: phi over the *current* gradient, no shift.

    m_t = beta1 m_{t-1} + (1 - beta1) g_t and v_t = beta2 v_{t-1} + (1 - beta2) phi(g_t^2),
    both bias-corrected as in Adam; theta_t = theta_{t-1} - lr * m_hat / (sqrt(v_hat) + eps).
    It is Adam with one v per block -- it keeps v's correlation with g_t and is the
    ablation that shows the temporal shift is what matters (Appendix K: it performs
    like Adam). State: ``step``, ``exp_avg`` (parameter-sized), ``exp_avg_sq`` (per block).
    Weight decay is decoupled, as in :class:`AdaShift`.
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 spatial_op: str = "max", eps: float = 1e-10, weight_decay: float = 0.0,
                 maximize: bool = False, spatial_block: str = "tensor"):
        _check_common(lr, betas, eps, weight_decay, spatial_op, spatial_block, beta1_may_be_one=False,
                      maximize=maximize)
        defaults = dict(lr=lr, betas=tuple(betas), spatial_op=spatial_op, spatial_block=spatial_block,
                        eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise _sparse_error("AdaShiftSpatial")
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        block_reduce(torch.zeros_like(p), group["spatial_op"], group["spatial_block"]))
                state["step"] += 1
                t = state["step"]
                state["exp_avg"].lerp_(g, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).add_(
                    block_reduce(g * g, group["spatial_op"], group["spatial_block"]), alpha=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                if group["weight_decay"] != 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))
        return loss

