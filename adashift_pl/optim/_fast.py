"""The fast AdaShift step: one fused pass over every tensor of a param group.

An optimizer step is memory-bound. The steady-state AdaShift step (t > n) needs
exactly the traffic of Adam's: read p, g, the running window sum S and the oldest
history slot g_{t-m}; write p, S and that slot (it receives g_t); the block value
phi(g_t^2) is reduced in the same pass, because the update at step t only needs
phi(g_{t-n}^2), which was computed n steps ago. Two implementations:

* ``kernel`` (CPU): a ~150-line C kernel (below) built once per machine with the
  system C compiler (``cc -O3 -march=native -fopenmp``, about 1-3 s, cached in
  ``~/.cache/adashift_pl``) and called through ctypes -- one call per
  (param group, dtype). It links the same libgomp that torch already loaded, so
  it runs on torch's thread count (``torch.set_num_threads``). Work is split in
  fixed chunks whose partial reductions are combined in a fixed order, so the
  result does not depend on the number of threads.
* ``foreach`` (any device, no compiler needed): the same maths with
  ``torch._foreach_*`` multi-tensor ops, grouped by device and dtype. On CUDA
  these are real multi-tensor kernels; on CPU they are loops of ordinary ops.

Both handle only the steady state (t > n, not a resync step, dense contiguous
tensors); everything else -- the first n steps, the exact recompute of S every
``_RESYNC_EVERY`` steps, odd layouts -- goes through the reference per-parameter
function :func:`adashift_pl.optim.adashift.adashift`. The state layout is the
same for every path, so a state_dict saved by one loads into the other.

Set ``ADASHIFT_PL_NO_KERNEL=1`` to never build or use the C kernel (the foreach
path is used instead); ``ADASHIFT_PL_CACHE`` overrides the cache directory.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["kernel_available", "kernel_build_seconds", "run_kernel", "run_foreach", "KERNEL_DTYPES"]

_C_COMMON = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define CHUNK 32768  /* elements per work unit: partial sums are combined in unit order */
#define SUB 1024     /* the block reduction re-reads each cache-hot sub-chunk just written */

typedef struct { int64_t tensor, start, end, block0, block1; } unit_t;

static inline float bf16_load(uint16_t h) { uint32_t u = ((uint32_t)h) << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t bf16_store(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                            /* round to nearest even */
    return (uint16_t)(u >> 16);
}
static inline float f32_load(float x) { return x; }
static inline float f32_store(float x) { return x; }
static inline double f64_load(double x) { return x; }
static inline double f64_store(double x) { return x; }

/* Work units: one-block tensors are cut into CHUNK-element ranges (partial reductions combined
   afterwards, in unit order); row-block tensors are cut on block boundaries. */
static int64_t units_per_tensor(int64_t n, int64_t b) {
    if (b <= 1) return n == 0 ? 1 : (n + CHUNK - 1) / CHUNK;
    int64_t len = n / b, per = len >= CHUNK ? 1 : CHUNK / (len > 0 ? len : 1);
    return (b + per - 1) / per;
}
static int64_t count_units(int64_t nt, const int64_t* numel, const int64_t* nblocks) {
    int64_t k = 0;
    for (int64_t i = 0; i < nt; ++i) k += units_per_tensor(numel[i], nblocks[i]);
    return k;
}
static void make_units(int64_t nt, const int64_t* numel, const int64_t* nblocks, unit_t* u) {
    int64_t k = 0;
    for (int64_t i = 0; i < nt; ++i) {
        int64_t n = numel[i], b = nblocks[i];
        if (b <= 1) {
            int64_t s = 0;
            do {
                u[k].tensor = i; u[k].start = s; u[k].end = s + CHUNK < n ? s + CHUNK : n;
                u[k].block0 = 0; u[k].block1 = 1; ++k; s += CHUNK;
            } while (s < n);
        } else {
            int64_t len = n / b, per = len >= CHUNK ? 1 : CHUNK / (len > 0 ? len : 1);
            for (int64_t j = 0; j < b; j += per) {
                int64_t j1 = j + per < b ? j + per : b;
                u[k].tensor = i; u[k].start = j * len; u[k].end = j1 * len;
                u[k].block0 = j; u[k].block1 = j1; ++k;
            }
        }
    }
}

int64_t adashift_work_size(int64_t nt, const int64_t* numel, const int64_t* nblocks) {
    int64_t b = 0;
    for (int64_t i = 0; i < nt; ++i) b += nblocks[i];
    return b + 2 * count_units(nt, numel, nblocks);
}
"""

# One copy per storage type T (arithmetic type A, integer type U of T's width, ABS: mask of the sign bit).
_C_TYPED = r"""
/* S <- b1 S + g - c h;  h <- g;  p <- p decay - S sc   (phi = max/mean: sc is the block's lr / denominator) */
static void upd_block_SFX(T* restrict p, const T* restrict g, T* restrict s, T* restrict h, int64_t n,
                          A sign, A b1, A c, A decay, A sc) {
    for (int64_t e = 0; e < n; ++e) {
        A gg = sign * LD(g[e]);
        T ss = ST(LD(ST(LD(s[e]) * b1 + gg)) - c * LD(h[e]));
        s[e] = ss; h[e] = ST(gg);
        p[e] = ST(LD(p[e]) * decay - LD(ss) * sc);
    }
}
/* phi = none: v element-wise from g_{t-n} (in hw), g_{t-m} in hm (hm may be hw itself: m = n) */
#define NONE_BODY                                                                       \
        A gg = sign * LD(g[e]); A old = LD(hw[e]);                                      \
        T ss = ST(LD(ST(LD(s[e]) * b1 + gg)) - c * LD(hm[e]));                         \
        T vs = ST(LD(ST(LD(v[e]) * b2)) + omb2 * LD(ST(old * old)));                   \
        A den = (A)sqrt(LD(vs) / bc) + eps;                                             \
        s[e] = ss; v[e] = vs; hw[e] = ST(gg);                                           \
        p[e] = ST(LD(p[e]) * decay - lrw * LD(ss) / den);
static void upd_none_SFX(T* restrict p, const T* restrict g, T* restrict s, T* restrict hw, const T* restrict hm,
                         T* restrict v, int64_t n, A sign, A b1, A c, A b2, A omb2, A bc, A eps, A decay, A lrw) {
    for (int64_t e = 0; e < n; ++e) { NONE_BODY }
}
static void upd_none_alias_SFX(T* restrict p, const T* restrict g, T* restrict s, T* restrict hw,
                               T* restrict v, int64_t n, A sign, A b1, A c, A b2, A omb2, A bc, A eps, A decay,
                               A lrw) {
    const T* hm = hw;
    for (int64_t e = 0; e < n; ++e) { NONE_BODY }
}
/* max |x| as the integer order of |x|'s bits (NaN, all ones in the exponent, stays on top) */
static U absmax_SFX(const T* restrict x, int64_t n, U acc) {
    const U* restrict u = (const U*)x;
    for (int64_t e = 0; e < n; ++e) { U b = u[e] & ABS; acc = b > acc ? b : acc; }
    return acc;
}
/* sum of x^2 (each square rounded to T, as torch computes g * g) in 8 double lanes, fixed order */
static double sumsq_SFX(const T* restrict x, int64_t n) {
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t e = 0;
    for (; e + 8 <= n; e += 8)
        for (int j = 0; j < 8; ++j) { A y = LD(x[e + j]); lane[j] += (double)LD(ST(y * y)); }
    double tail = 0;
    for (; e < n; ++e) { A y = LD(x[e]); tail += (double)LD(ST(y * y)); }
    return (((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))) + tail;
}
static A from_bits_SFX(U b) { T t; memcpy(&t, &b, sizeof(T)); return LD(t); }

void adashift_step_SFX(int64_t nt, const int64_t* P, const int64_t* G, const int64_t* S, const int64_t* HW,
                       const int64_t* HM, const int64_t* V, const int64_t* PHI, const int64_t* numel,
                       const int64_t* nblocks, const double* bc2, int op, int maximize, double b1, double c,
                       double b2, double lr_ws, double eps, double decay, double* work) {
    /* op: 0 max, 1 mean, 2 none. work: [per-block scale][per-unit partial][per-unit NaN flag] */
    int64_t nunits = count_units(nt, numel, nblocks);
    unit_t* units = (unit_t*)malloc(sizeof(unit_t) * (size_t)nunits);
    int64_t* boff = (int64_t*)malloc(sizeof(int64_t) * (size_t)(nt + 1));
    make_units(nt, numel, nblocks, units);
    boff[0] = 0;
    for (int64_t i = 0; i < nt; ++i) boff[i + 1] = boff[i] + nblocks[i];
    double* scale = work; double* partial = work + boff[nt];
    const A sign = maximize ? (A)-1 : (A)1, ab1 = (A)b1, ac = (A)c, ab2 = (A)b2, aomb2 = (A)(1.0 - b2);
    const A adecay = (A)decay;
    /* phase 0: v_t = b2 v + (1 - b2) phi(g_{t-n}^2) per block, read before the slot is rewritten */
    if (op != 2) {
        for (int64_t i = 0; i < nt; ++i) {
            T* v = (T*)V[i]; const T* phi = (const T*)PHI[i];
            for (int64_t j = 0; j < nblocks[i]; ++j) {
                v[j] = ST(LD(ST(LD(v[j]) * ab2)) + aomb2 * LD(phi[j]));
                scale[boff[i] + j] = lr_ws / (sqrt((double)LD(v[j]) / bc2[i]) + eps);
            }
        }
    }
    int64_t total = 0;
    for (int64_t i = 0; i < nt; ++i) total += numel[i];
    /* small steps stay on the calling thread: waking the pool costs more than the work */
    #pragma omp parallel for schedule(dynamic, 1) if(total >= 4 * CHUNK)
    for (int64_t k = 0; k < nunits; ++k) {
        const unit_t u = units[k]; const int64_t i = u.tensor;
        T* p = (T*)P[i]; const T* g = (const T*)G[i]; T* s = (T*)S[i]; T* hw = (T*)HW[i];
        const T* hm = (const T*)HM[i];
        if (op == 2) {
            T* v = (T*)V[i]; const int64_t e0 = u.start, n = u.end - u.start;
            if (hm == hw)
                upd_none_alias_SFX(p + e0, g + e0, s + e0, hw + e0, v + e0, n, sign, ab1, ac, ab2, aomb2,
                                   (A)bc2[i], (A)eps, adecay, (A)lr_ws);
            else
                upd_none_SFX(p + e0, g + e0, s + e0, hw + e0, hm + e0, v + e0, n, sign, ab1, ac, ab2, aomb2,
                             (A)bc2[i], (A)eps, adecay, (A)lr_ws);
            continue;
        }
        const int rows = nblocks[i] > 1;
        const int64_t len = rows ? numel[i] / nblocks[i] : u.end - u.start;
        for (int64_t j = u.block0; j < u.block1; ++j) {
            const int64_t e0 = rows ? j * len : u.start;
            const A sc = (A)scale[boff[i] + j];
            U mx = 0; double sum = 0;
            for (int64_t a = 0; a < len; a += SUB) {   /* for max/mean, hw is hm: one slot */
                const int64_t n = len - a < SUB ? len - a : SUB, e = e0 + a;
                upd_block_SFX(p + e, g + e, s + e, hw + e, n, sign, ab1, ac, adecay, sc);
                if (op == 0) mx = absmax_SFX(hw + e, n, mx); else sum += sumsq_SFX(hw + e, n);
            }
            if (rows) {
                T* phi = (T*)PHI[i];
                A r;
                if (op == 0) { A m = from_bits_SFX(mx); r = m * m; } else r = (A)(sum / (double)len);
                phi[j] = ST(r);
            } else if (op == 0) {
                uint64_t w = (uint64_t)mx; memcpy(&partial[2 * k], &w, 8);  /* the bits, exactly */
            } else {
                partial[2 * k] = sum;
            }
        }
    }
    /* combine the partial reductions of one-block tensors in unit order (thread-count independent) */
    if (op != 2) {
        int64_t k = 0;
        while (k < nunits) {
            const int64_t i = units[k].tensor;
            if (nblocks[i] > 1) { ++k; continue; }
            U mx = 0; double sum = 0;
            for (; k < nunits && units[k].tensor == i; ++k) {
                if (op == 0) { uint64_t w; memcpy(&w, &partial[2 * k], 8); mx = (U)w > mx ? (U)w : mx; }
                else sum += partial[2 * k];
            }
            A r;
            if (op == 0) { A m = from_bits_SFX(mx); r = m * m; } else r = (A)(sum / (double)numel[i]);
            ((T*)PHI[i])[0] = ST(r);
        }
    }
    free(units); free(boff);
}
"""

_C_TYPES = {"f32": ("float", "float", "uint32_t", "0x7fffffffu", "f32_load", "f32_store"),
         "f64": ("double", "double", "uint64_t", "0x7fffffffffffffffull", "f64_load", "f64_store"),
         "bf16": ("uint16_t", "float", "uint16_t", "(uint16_t)0x7fffu", "bf16_load", "bf16_store")}

def _c_source() -> str:
    out = [_C_COMMON]
    for sfx, (T, A, U, ABS, LD, ST) in _C_TYPES.items():
        code = _C_TYPED
        for k, v in (("SFX", sfx), ("ABS", ABS), ("LD", LD), ("ST", ST)):
            code = code.replace(k, v)
        code = re.sub(r"\bT\b", T, code); code = re.sub(r"\bA\b", A, code); code = re.sub(r"\bU\b", U, code)
        out.append(code)
    return "\n".join(out)


_C_SOURCE = _c_source()

KERNEL_DTYPES = {torch.float32: "adashift_step_f32", torch.float64: "adashift_step_f64",
                 torch.bfloat16: "adashift_step_bf16"}
_OPS = {"max": 0, "mean": 1, "none": 2}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_tried = False
_build_seconds: float | None = None


def _cache_dir() -> Path:
    root = os.environ.get("ADASHIFT_PL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "adashift_pl")
    return Path(root)


def _cpu_key() -> str:
    # -march=native code must not be reused on a different CPU (shared home directories on clusters).
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _build() -> ctypes.CDLL | None:
    global _build_seconds
    if sys.platform != "linux" or os.environ.get("ADASHIFT_PL_NO_KERNEL") == "1":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    digest = hashlib.sha256((_C_SOURCE + cc + _cpu_key()).encode()).hexdigest()[:20]
    path = _cache_dir() / f"adashift_kernel_{digest}.so"
    t0 = time.perf_counter()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src = Path(tmp) / "adashift_kernel.c"
            src.write_text(_C_SOURCE)
            out = Path(tmp) / path.name
            err = ""
            for arch in (["-march=native"], []):  # some compilers do not know -march=native
                cmd = [cc, "-O3", *arch, "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", str(src), "-o", str(out), "-lm"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode == 0:
                    break
                err = proc.stderr[-2000:]
            else:
                warnings.warn(f"AdaShift: building the fused CPU kernel with {cc} failed, using the foreach path "
                              f"(slower). Compiler output:\n{err}", RuntimeWarning, stacklevel=3)
                return None
            os.replace(out, path)  # atomic: concurrent processes (DDP ranks) may build at once
    lib = ctypes.CDLL(str(path))
    vp, i64, dbl, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    for name in KERNEL_DTYPES.values():
        fn = getattr(lib, name)
        fn.argtypes = [i64, *[vp] * 10, cint, cint, *[dbl] * 6, vp]
        fn.restype = None
    lib.adashift_work_size.argtypes = [i64, vp, vp]
    lib.adashift_work_size.restype = i64
    _build_seconds = time.perf_counter() - t0
    return lib


def _get_lib() -> ctypes.CDLL | None:
    global _lib, _lib_tried
    if not _lib_tried:
        with _lock:
            if not _lib_tried:
                try:
                    _lib = _build()
                except Exception as exc:  # no compiler, read-only cache, ...: fall back, loudly once
                    warnings.warn(f"AdaShift: the fused CPU kernel is unavailable ({exc!r}); using the foreach path.",
                                  RuntimeWarning, stacklevel=3)
                    _lib = None
                _lib_tried = True
    return _lib


def kernel_available() -> bool:
    """Whether the fused CPU kernel is (or can be) built on this machine."""
    return _get_lib() is not None


def kernel_build_seconds() -> float | None:
    """Seconds the first use spent building or loading the kernel (None before the first use)."""
    _get_lib()
    return _build_seconds


def run_kernel(params: list[Tensor], grads: list[Tensor], states: list[dict], *, beta1: float, beta2: float,
               keep_num: int, window: int, spatial_op: str, lr: float, eps: float, weight_decay: float,
               maximize: bool) -> None:
    """One steady-state step (every state has step >= keep_num, the step about to run is no resync)
    for CPU tensors of one dtype, in one C call. Increments step and updates."""
    lib = _get_lib()
    n, m = keep_num, window
    nt = len(params)
    slots = n if spatial_op == "none" else m
    elementwise = spatial_op == "none"
    # Raw addresses, not tensor views: a view costs microseconds, an address is arithmetic.
    P, G, S, HW, HM, V, PHI, numel, nblocks, bc2 = ([] for _ in range(10))
    for p, g, st in zip(params, grads, states):
        t = st["step"] + 1
        k = st["updates"] + 1
        st["step"], st["updates"] = t, k
        h, v = st["history"], st["exp_avg_sq"]
        size = p.numel()
        slot_bytes = size * h.element_size()
        base = h.data_ptr()
        P.append(p.data_ptr())
        G.append(g.data_ptr())
        S.append(st["exp_avg_sum"].data_ptr())
        HW.append(base + ((t - 1) % slots) * slot_bytes)
        HM.append(base + ((t - 1 - m) % slots) * slot_bytes)
        V.append(v.data_ptr())
        if elementwise:
            PHI.append(0)
        else:
            ph = st["phi_history"]
            PHI.append(ph.data_ptr() + ((t - 1) % n) * ph.stride(0) * ph.element_size())
        numel.append(size)
        nblocks.append(v.numel())
        bc2.append(1 - beta2 ** k)
    P, G, S, HW, HM, V, PHI, numel, nblocks = (np.array(x, dtype=np.int64) for x in (P, G, S, HW, HM, V, PHI, numel,
                                                                                    nblocks))
    bc2 = np.array(bc2, dtype=np.float64)
    work = np.empty(int(lib.adashift_work_size(nt, numel.ctypes.data, nblocks.ctypes.data)), dtype=np.float64)
    weight_sum = float(m) if beta1 == 1.0 else (1 - beta1 ** m) / (1 - beta1)
    fn = getattr(lib, KERNEL_DTYPES[params[0].dtype])
    fn(nt, P.ctypes.data, G.ctypes.data, S.ctypes.data, HW.ctypes.data, HM.ctypes.data, V.ctypes.data,
       PHI.ctypes.data, numel.ctypes.data, nblocks.ctypes.data, bc2.ctypes.data, _OPS[spatial_op], int(maximize),
       float(beta1), float(beta1 ** m), float(beta2), float(lr) / weight_sum, float(eps),
       1.0 - float(lr) * float(weight_decay), work.ctypes.data)


def run_foreach(params: list[Tensor], grads: list[Tensor], states: list[dict], *, beta1: float, beta2: float,
                keep_num: int, window: int, spatial_op: str, spatial_block: str, lr: float, eps: float,
                weight_decay: float, maximize: bool) -> None:
    """The same steady-state step with torch._foreach_* ops (tensors of one device and dtype)."""
    from adashift_pl.optim.adashift import block_reduce

    n, m = keep_num, window
    slots = n if spatial_op == "none" else m
    hw, hm, phi_slot, bc2 = [], [], [], []
    for st in states:
        t = st["step"] + 1
        k = st["updates"] + 1
        st["step"], st["updates"] = t, k
        h = st["history"]
        hw.append(h[(t - 1) % slots])
        hm.append(h[(t - 1 - m) % slots])
        if spatial_op != "none":
            phi_slot.append(st["phi_history"][(t - 1) % n])
        bc2.append(1 - beta2 ** k)
    sums = [st["exp_avg_sum"] for st in states]
    vs = [st["exp_avg_sq"] for st in states]
    g = torch._foreach_neg(grads) if maximize else grads
    phi_old = torch._foreach_mul(hw, hw) if spatial_op == "none" else [x.clone() for x in phi_slot]
    torch._foreach_mul_(sums, beta1)
    torch._foreach_add_(sums, g)
    torch._foreach_add_(sums, hm, alpha=-(beta1 ** m))
    torch._foreach_copy_(hw, g)
    if spatial_op != "none":
        for slot, gi in zip(phi_slot, g):
            slot.copy_(block_reduce(gi * gi, spatial_op, spatial_block))
    torch._foreach_mul_(vs, beta2)
    torch._foreach_add_(vs, phi_old, alpha=1 - beta2)
    weight_sum = float(m) if beta1 == 1.0 else (1 - beta1 ** m) / (1 - beta1)
    denom = torch._foreach_div(vs, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(denom, weight_sum)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    if spatial_op == "none":
        torch._foreach_addcdiv_(params, sums, denom, value=-lr)
    else:  # denom is one value per block: broadcast it per tensor
        for p, s, d in zip(params, sums, denom):
            p.addcdiv_(s, d, value=-lr)
