"""torch's seeded CPU ``randn`` and ``rand`` (float32), computed with numpy, bit for bit.

The ``random`` and ``uniform_random`` gate modes draw their rows from ``torch.Generator().manual_seed(seed)``
(BRIEF §3: what mergekit-moe does), and a saved recipe must give the same rows on every run. A merge in those
modes needs torch for nothing else, and importing torch costs 1.5-3 s of CPU: beside a local merge, which is
a kernel copy on every core, that was most of what lazymoe took over a plain copy. So the rows are drawn here,
the way torch draws them on an x86 CPU with AVX2 (every x86 machine Colab and the Hub's users run), and
``tests/test_seeded.py`` compares every bit with torch's own across seeds and shapes.

What torch 2.x does (``aten/src/ATen/native/cpu/DistributionTemplates.h``, ``avx_mathfun.h``):

* The generator is MT19937 seeded by the standard ``init_genrand`` with the seed's low 32 bits. numpy's legacy
  ``RandomState(int)`` seeds the same engine the same way, and ``randint(0, 2**32, dtype=uint32)`` hands out
  its raw 32-bit words one per value.
* A float32 uniform in [0, 1) is ``(word & (2**24 - 1)) * 2**-24`` (exact).
* ``randn`` of a contiguous float32 tensor of 16 or more values first fills the whole tensor with uniforms,
  then turns each block of 16 into normals by Box-Muller over the pairs (j, j + 8):
  ``r = sqrt(-2 log(1 - u[j]))``, ``theta = 2 pi u[j + 8]``, ``out[j] = r cos theta``,
  ``out[j + 8] = r sin theta``. When the size is not a multiple of 16, 16 fresh uniforms are drawn for the
  last 16 values, which are computed again (overwriting part of the last full block).
* log, sin and cos there are not libm's but Cephes' float32 polynomials (``log256_ps``, ``sincos256_ps``),
  built with GCC's default contraction: a multiply feeding an add is one fused multiply-add, rounded once.
  ``_fma`` below rounds exactly once too, so every value is the one the compiled kernel gives.
* Fewer than 16 values take another path (one double-precision Box-Muller per value, with a cached second
  sample); ``randn`` hands those to torch itself. No router is that small except in tests.

torch on a CPU without AVX2 (ARM: Apple silicon, Graviton) takes libm's ``logf``/``cosf``/``sinf`` instead,
and its last bits differ from these; a merge there gets the rows an x86 machine gets for the same seed.
"""

from __future__ import annotations

import math

from ..lazy import np, torch

_F32_MIN_NORMAL = 0x00800000
_EXPONENT_MASK = 0x7F800000
_SQRT_HALF = 0.707106781186547524
_LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
             -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
_LOG_Q1, _LOG_Q2 = -2.12194440e-4, 0.693359375
_FOUR_OVER_PI = 1.27323954473516
_PI4_PARTS = (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8)  # -pi/4 in three pieces
_COS_POLY = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)
_SIN_POLY = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)
_TWO_PI = 6.283185307179586  # rounded to float32 where used, as _mm256_set1_ps(2.0f * pi<double>) does


def _words(seed: int, n: int):
    """The first ``n`` 32-bit outputs of torch's CPU generator after ``manual_seed(seed)``."""
    return np.random.RandomState(seed & 0xFFFFFFFF).randint(0, 2**32, size=n, dtype=np.uint32)


def _uniform(words):
    return (words & np.uint32(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)


def _f32(x):
    return np.float32(x)


def _fma(a, b, c):
    """float32 ``a * b + c`` rounded once, as the fused instruction does (element-wise, any broadcastable inputs).

    The product of two float32 values is exact in float64, so the float64 sum is the exact sum rounded once,
    and rounding that to float32 gives the fused result, unless the float64 sum lies exactly halfway between
    two float32 values while the exact sum does not (or is too small for float32's full precision): those few
    are settled by ``_fma_exact``.
    """
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    s = p + np.asarray(c, np.float64)
    with np.errstate(over="ignore"):  # past float32's range: infinity, as the instruction gives
        r = s.astype(np.float32)
    halfway = (s.view(np.uint64) & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000)
    doubtful = halfway | (np.abs(s) < 2.0**-125)
    if doubtful.any():
        where = np.nonzero(doubtful)
        shape = r.shape
        r[where] = _fma_exact(*(np.broadcast_to(np.asarray(v, np.float32), shape)[where] for v in (a, b, c)))
    return r


def _fma_exact(a, b, c):
    """``_fma`` for any inputs: the float64 sum's rounding error (two-sum) decides halfway cases, the largest
    of which is float32's overflow threshold (FLT_MAX + half a step: at or past it the fused result is
    infinite, just below it FLT_MAX)."""
    with np.errstate(over="ignore", invalid="ignore"):
        p = a.astype(np.float64) * b.astype(np.float64)
        c = c.astype(np.float64)
        s = p + c
        back = s - p
        err = (p - (s - back)) + (c - back)
        r = s.astype(np.float32)
        below = s - r.astype(np.float64)  # > 0: s lies above r
        other = np.nextafter(r, np.where(below > 0, np.float32(np.inf), np.float32(-np.inf)))
        tie = (below != 0) & (other.astype(np.float64) - s == below) & (err != 0)
        r = np.where(tie & ((err > 0) == (below > 0)), other, r)
        flt_max = np.finfo(np.float32).max
        short = np.isinf(r) & (np.abs(s) == float(flt_max) + 2.0**103) & (err * s < 0)
        return np.where(short, np.copysign(flt_max, s).astype(np.float32), r)


def _log(x):
    """avx_mathfun's ``log256_ps``, for x in (0, 1]."""
    x = np.maximum(x, np.array(_F32_MIN_NORMAL, np.uint32).view(np.float32))
    bits = x.view(np.uint32)
    e = ((bits >> np.uint32(23)).astype(np.int32) - 0x7F).astype(np.float32) + _f32(1)
    x = ((bits & np.uint32(~_EXPONENT_MASK & 0xFFFFFFFF)) | np.float32(0.5).view(np.uint32)).view(np.float32)
    small = x < _f32(_SQRT_HALF)
    tmp = np.where(small, x, _f32(0))
    x = x - _f32(1)
    e = e - np.where(small, _f32(1), _f32(0))
    x = x + tmp
    z = x * x
    y = np.full_like(x, _f32(_LOG_POLY[0]))
    for coeff in _LOG_POLY[1:]:
        y = _fma(y, x, _f32(coeff))
    y = y * x
    y = _fma(y, z, e * _f32(_LOG_Q1))
    y = _fma(z, _f32(-0.5), y)
    x = x + y
    return _fma(e, _f32(_LOG_Q2), x)


def _sincos(theta):
    """avx_mathfun's ``sincos256_ps``: (sin, cos)."""
    bits = theta.view(np.uint32)
    sign_sin = bits & np.uint32(0x80000000)
    x = (bits & np.uint32(0x7FFFFFFF)).view(np.float32)
    j = (x * _f32(_FOUR_OVER_PI)).astype(np.int32)  # truncation, as cvttps
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    sign_sin = sign_sin ^ ((j & 4).astype(np.uint32) << np.uint32(29))
    sign_cos = (~(j - 2) & 4).astype(np.uint32) << np.uint32(29)
    use_sin_poly = (j & 2) == 0
    for part in _PI4_PARTS:
        x = _fma(y, _f32(part), x)
    z = x * x
    yc = _fma(_f32(_COS_POLY[0]), z, _f32(_COS_POLY[1]))
    yc = _fma(yc, z, _f32(_COS_POLY[2]))
    yc = yc * z
    yc = _fma(yc, z, -(z * _f32(0.5)))
    yc = yc + _f32(1)
    ys = _fma(_f32(_SIN_POLY[0]), z, _f32(_SIN_POLY[1]))
    ys = _fma(ys, z, _f32(_SIN_POLY[2]))
    ys = ys * z
    ys = _fma(ys, x, x)
    sin = np.where(use_sin_poly, ys, yc)
    cos = np.where(use_sin_poly, yc, ys)
    return (sin.view(np.uint32) ^ sign_sin).view(np.float32), (cos.view(np.uint32) ^ sign_cos).view(np.float32)


def _box_muller(blocks):
    """(n, 16) uniforms -> (n, 16) normals, each row as ``normal_fill_16_AVX2`` with mean 0 and std 1."""
    radius = np.sqrt(_f32(-2) * _log(_f32(1) - blocks[:, :8]))
    sin, cos = _sincos(_f32(_TWO_PI) * blocks[:, 8:])
    return np.concatenate([radius * cos, radius * sin], axis=1)


def randn(shape: tuple[int, ...], seed: int):
    """``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` as a float32 numpy array."""
    n = math.prod(shape)
    if n < 16:  # torch's other path (see the module docstring): ask torch
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
    full = n // 16 * 16
    tail = 16 if n % 16 else 0
    uniforms = _uniform(_words(seed, n + tail))
    out = uniforms[:n].copy()
    out[:full] = _box_muller(out[:full].reshape(-1, 16)).reshape(-1)
    if tail:
        out[n - 16:] = _box_muller(uniforms[n:].reshape(1, 16)).reshape(-1)
    return out.reshape(shape)


def rand(shape: tuple[int, ...], seed: int):
    """``torch.rand(shape, generator=torch.Generator().manual_seed(seed))`` as a float32 numpy array."""
    return _uniform(_words(seed, math.prod(shape))).reshape(shape)
