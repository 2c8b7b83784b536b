r"""ADOPT (Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate",
NeurIPS 2024) as a torch.optim optimizer.

The algorithm of the official implementation (iShohei220/adopt, ``src/adopt/adopt.py``, with the
clipping added on 2024-11-22). For one parameter, with k the number of steps taken before this one:

.. math::
    k = 0:\quad v \leftarrow g^2 \quad \text{(the parameter does not move)}

    k \ge 1:\quad n = \mathrm{clip}\Big(\frac{g}{\max(\sqrt{v}, \epsilon)},\ \pm k^{c}\Big), \qquad
    m \leftarrow m + (1 - \beta_1)(n - m), \qquad
    \theta \leftarrow \theta - \alpha\, m, \qquad
    v \leftarrow \beta_2 v + (1 - \beta_2)\, g^2

with c = ``clip_exp`` (0.25, the official ``clip_lambda = step**0.25``; None: the unclipped
original). No bias correction. eps is a floor on sqrt(v), not added to it.

Its relation to AdaShift: g_t is normalised by a v that does not contain g_t -- v is updated only
after the step -- which is AdaShift's temporal shift with n = 1 and an element-wise phi; ADOPT
normalises *before* the momentum (m averages normalised gradients) and clips the normalised
gradient, so a near-zero v (e.g. a zero first gradient) cannot produce a huge step.

Weight decay follows the official code: ``decouple=False`` adds ``weight_decay * theta`` to the
gradient (so it enters v too, from the first step on); ``decouple=True`` multiplies theta by
(1 - lr * weight_decay) on every step that updates (AdamW style; the official README's advice when
replacing AdamW).

Why not the official package (``torch-adopt``) itself: it installs here, but it is built on torch's
private optimizer helpers (deprecation warnings on torch 2.14 today), and its foreach path decides
"first step" for a whole group from its first tensor. This file does the same arithmetic, operation
for operation, in the style of :mod:`adashift_pl.optim.adashift`; tests/test_adopt.py checks it
against a float64 transcription of the equations above.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from adashift_pl.optim.adashift import _is_real, _run_closure, _sparse_error

__all__ = ["ADOPT", "adopt"]


def _check(lr, betas, eps, clip_exp, weight_decay, decouple, maximize) -> None:
    if not (_is_real(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr!r} (allowed: lr >= 0)")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) for b in betas)):
        raise ValueError(f"Invalid betas: {betas!r} (allowed: a pair of numbers (beta1, beta2))")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]} (allowed: 0 <= beta1 < 1)")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]} (allowed: 0 <= beta2 < 1)")
    if not (_is_real(eps) and eps >= 0.0):
        raise ValueError(f"Invalid epsilon value: {eps!r} (allowed: a number eps >= 0)")
    if clip_exp is not None and not (_is_real(clip_exp) and clip_exp >= 0.0):
        raise ValueError(f"Invalid clip_exp value: {clip_exp!r} (allowed: a number >= 0, or None for no clipping)")
    if not (_is_real(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (allowed: a number weight_decay >= 0)")
    if not isinstance(decouple, bool):
        raise ValueError(f"Invalid decouple value: {decouple!r} (allowed: True, False)")
    if not isinstance(maximize, bool):
        raise ValueError(f"Invalid maximize value: {maximize!r} (allowed: True, False)")


class ADOPT(Optimizer):
    """ADOPT with the official clipping. See the module docstring for the maths.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate alpha (default 1e-3; the official README: use Adam's lr).
        betas: (beta1, beta2), default (0.9, 0.9999) as in the official code.
        eps: floor on sqrt(v) (default 1e-6), not added to it.
        clip_exp: the normalised gradient is clipped to +-k**clip_exp at the k-th update (default
            0.25 = the official ``clip_lambda``); None disables the clip (the original ADOPT).
        weight_decay: weight decay coefficient (default 0).
        decouple: False (default): L2, weight_decay * theta added to the gradient; True: decoupled
            decay theta <- theta * (1 - lr * weight_decay) (use it where AdamW would be used).
        maximize: maximize the objective instead of minimizing.

    State per parameter: ``step`` (an int64 0-d tensor: steps taken, the first included --
    int64 keeps counting where torch's float32 step would stop at 2**24), ``exp_avg`` (m) and
    ``exp_avg_sq`` (v), both parameter-sized. Only tensors, so checkpoints load with
    ``torch.load(weights_only=True)``; the layout is the official implementation's.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        clip_exp: float | None = 0.25,
        weight_decay: float = 0.0,
        decouple: bool = False,
        maximize: bool = False,
    ):
        _check(lr, betas, eps, clip_exp, weight_decay, decouple, maximize)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, clip_exp=clip_exp, weight_decay=weight_decay,
                        decouple=decouple, maximize=maximize)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # Per-group hyper-parameters get the same checks as the constructor's.
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        g["betas"] = tuple(g["betas"])
        _check(g["lr"], g["betas"], g["eps"], g["clip_exp"], g["weight_decay"], g["decouple"], g["maximize"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One optimizer step; runs ``closure`` under grad first and returns its loss."""
        loss = _run_closure(closure)
        for group in self.param_groups:
            hyper = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                         clip_exp=group["clip_exp"], weight_decay=group["weight_decay"],
                         decouple=group["decouple"], maximize=group["maximize"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise _sparse_error("ADOPT")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0, dtype=torch.int64)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                adopt(p, p.grad, state, **hyper)
        return loss


def adopt(param: Tensor, grad: Tensor, state: dict, *, lr: float, beta1: float, beta2: float, eps: float,
          clip_exp: float | None, weight_decay: float, decouple: bool, maximize: bool) -> None:
    """The functional ADOPT update of one parameter (in place on ``param`` and ``state``).

    The operations and their order are the official implementation's, so float32 results agree
    with it bit for bit."""
    g = -grad if maximize else grad
    if weight_decay != 0 and not decouple:
        g = g.add(param, alpha=weight_decay)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if torch.is_complex(param):  # real and imaginary parts are separate coordinates, as in torch.optim
        g, m, v, param = (torch.view_as_real(x) for x in (g, m, v, param))
    k = int(state["step"])  # steps taken before this one
    state["step"] += 1
    if k == 0:
        v.addcmul_(g, g)  # the first gradient only initialises v
        return
    if weight_decay != 0 and decouple:
        param.add_(param, alpha=-lr * weight_decay)
    normed = g.div(v.sqrt().clamp_(min=eps))
    if clip_exp is not None:
        bound = k ** clip_exp
        normed.clamp_(-bound, bound)
    m.lerp_(normed, 1 - beta1)
    param.add_(m, alpha=-lr)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # only now does v see g_t
