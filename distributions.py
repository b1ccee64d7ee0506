"""Distributions and special functions that torch lacks or gets wrong, each tested against a
reference (float64, quadrature, mpmath, scipy) in test_vae.py:
- ContinuousBernoulli: exact at any logit (torch's clamps its probability first);
- DiscretizedLogistic: PixelCNN++'s likelihood of 8-bit levels (torch has none);
- CategoricalHeadNLL: a linear head's softmax NLL that never holds a batch's (M, 256) logits;
- ConvTranspose2d: the decoder's transposed convolution with a faster weight gradient on the CPU;
- the interval masses log P(lo <= X < hi) behind the exact 8-bit scores of the densities:
  normal_log_interval and beta_log_interval (torch has no incomplete beta function, nor its
  derivatives in a and b); log_sub_exp, the difference they are made of.
Everything below beta_log_interval is its machinery, private to this file.
"""
import logging
import math
import os
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Beta, Distribution, Normal, constraints
from torch.distributions.utils import broadcast_all


def log_sub_exp(big, small):
    """log(exp(big) - exp(small)) for small < big, as big + log(1 - exp(small - big)): no
    cancellation. Where small >= big it is big + log(tiny), finite, so that a branch that a
    torch.where discards passes no nan to autograd."""
    return big + torch.log(-torch.expm1((small - big).clamp(max=-torch.finfo(big.dtype).tiny)))


def log_abs_expm1(t):
    """log|exp(t) - 1| without overflow or cancellation (-inf at t = 0): for t > 0 it is
    t + log(1 - exp(-t)), for t < 0 log(1 - exp(t))."""
    return t.clamp(min=0) + torch.log(-torch.expm1(-t.abs()))


class ContinuousBernoulli(Distribution):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019) on [0, 1], parameterised by its
    logit e: p(x) = C(e) sigmoid(e)^x sigmoid(-e)^(1-x), C(e) = e / tanh(e / 2), which is
    e exp(e x) / (exp(e) - 1). Everything is computed from the logit, exact at any e.
    torch.distributions.ContinuousBernoulli clamps the probability to [eps, 1 - eps] before
    its normaliser, so in float32 its log-density saturates for |e| beyond about 16."""
    arg_constraints = {'logits': constraints.real}
    support = constraints.unit_interval
    has_rsample = True
    series = 0.1  # below this |e|, log C(e) and the mean use their Taylor series

    def __init__(self, logits, validate_args=None):
        self.logits = logits
        super().__init__(logits.shape, validate_args=validate_args)

    def _split(self):
        """e where |e| >= series (else a safe 1.0), e where |e| < series (else 0), and the mask."""
        e = self.logits
        small = e.abs() < self.series
        return torch.where(small, torch.ones_like(e), e), torch.where(small, e, torch.zeros_like(e)), small

    def log_normalizer(self):
        """log C(e) = log|e| - log tanh(|e| / 2); log 2 + e^2/12 - 7 e^4/1440 + 31 e^6/90720 near 0."""
        big, small_e, small = self._split()
        exact = torch.log(big.abs()) - torch.log(torch.tanh(big.abs() / 2))
        s2 = small_e * small_e
        return torch.where(small, math.log(2) + s2 / 12 - 7 * s2 * s2 / 1440 + 31 * s2 ** 3 / 90720, exact)

    def log_prob(self, value):
        e = self.logits
        return value * F.logsigmoid(e) + (1 - value) * F.logsigmoid(-e) + self.log_normalizer()

    @property
    def mean(self):
        """1 / (1 - exp(-e)) - 1 / e, as 1/t - exp(-t) / (1 - exp(-t)) with t = |e|, mirrored
        for e > 0 (no overflow); 1/2 + e/12 - e^3/720 + e^5/30240 near 0."""
        big, small_e, small = self._split()
        t = big.abs()
        m = 1 / t - torch.exp(-t) / -torch.expm1(-t)
        exact = torch.where(big < 0, m, 1 - m)
        return torch.where(small, 0.5 + small_e / 12 - small_e ** 3 / 720 + small_e ** 5 / 30240, exact)

    def cdf(self, value):
        """(exp(e x) - 1) / (exp(e) - 1), as exp(log_interval(0, x)): exact in both tails."""
        inside = value > 0
        safe = torch.where(inside, value, torch.ones_like(value))
        return torch.where(inside, self.log_interval(torch.zeros_like(safe), safe).exp(), torch.zeros_like(value))

    def icdf(self, u):
        """log(1 + u (exp(e) - 1)) / e; for e > 50 the same as 1 + log(u + (1 - u) exp(-e)) / e,
        which cannot overflow; u at e = 0."""
        e = self.logits
        zero, big = e == 0, e > 50
        mid = torch.where(zero | big, torch.ones_like(e), e)
        top = torch.where(big, e, torch.full_like(e, 100.0))
        direct = torch.log1p(u * torch.expm1(mid)) / mid
        upper = 1 + torch.log(u + (1 - u) * torch.exp(-top)) / top
        return torch.where(zero, u, torch.where(big, upper, direct))

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device)
        return self.icdf(u).clamp(0, 1)

    def log_interval(self, lo, hi):
        """log P(lo <= X < hi) = e lo + log|exp(e (hi - lo)) - 1| - log|exp(e) - 1|: a sum of
        terms without cancellation; log(hi - lo) at e = 0."""
        e = self.logits
        safe = torch.where(e == 0, torch.ones_like(e), e)
        exact = safe * lo + log_abs_expm1(safe * (hi - lo)) - log_abs_expm1(safe)
        return torch.where(e == 0, torch.log(hi - lo), exact)


class DiscretizedLogistic(Distribution):
    """Logistic(loc, scale) discretised to the 256 levels k/255 of an 8-bit pixel
    (PixelCNN++, Salimans et al. 2017): P(k) = F(k/255 + 1/510) - F(k/255 - 1/510),
    with the tails below level 0 and above level 255 folded into those levels."""
    arg_constraints = {'loc': constraints.real, 'scale': constraints.positive}
    support = constraints.unit_interval
    has_rsample = False
    half = 1 / 510  # half the distance between two levels

    def __init__(self, loc, scale, validate_args=None):
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def log_prob(self, value):
        k = torch.round(value * 255)
        inv = 1 / self.scale
        upper = (k / 255 + self.half - self.loc) * inv
        lower = (k / 255 - self.half - self.loc) * inv
        # sigmoid(u) - sigmoid(l) = sigmoid(-l) - sigmoid(-u): taken on the side of 0 where both are small
        flip = upper + lower > 0
        middle = log_sub_exp(F.logsigmoid(torch.where(flip, -lower, upper)),
                             F.logsigmoid(torch.where(flip, -upper, lower)))
        first = F.logsigmoid(upper)   # level 0: P(X < 1/510)
        last = F.logsigmoid(-lower)   # level 255: P(X > 1 - 1/510)
        return torch.where(k <= 0, first, torch.where(k >= 255, last, middle))

    @property
    def mean(self):
        """E[k] / 255 = sum_(k=1..255) P(K >= k) / 255, P(K >= k) = sigmoid((loc - k/255 + 1/510) / scale):
        one sigmoid per level, where the sum of k P(k) takes a log-probability per level."""
        edges = torch.arange(1, 256, dtype=self.loc.dtype, device=self.loc.device).view(255, 1) / 255 - self.half
        loc, scale = self.loc.reshape(-1), self.scale.reshape(-1)
        out = torch.empty_like(loc)
        for s in range(0, loc.numel(), 4096):    # (255, 4096) at a time stays in the caches: 12x faster
            out[s:s + 4096] = torch.sigmoid((loc[s:s + 4096] - edges) / scale[s:s + 4096]).sum(0)
        return out.view(self.loc.shape) / 255

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
            u = u.clamp(1e-6, 1 - 1e-6)
            x = self.loc.expand(shape) + self.scale.expand(shape) * (u.log() - (-u).log1p())
            return (x * 255).round().clamp(0, 255) / 255


class CategoricalHeadNLL(torch.autograd.Function):
    """-log softmax(h W^T + b)[target] for rows of per-pixel features h (M, F), in chunks:
    never holds the (M, K) logits of a whole batch, which a 256-way categorical would spend
    most of its step writing and reading. The backward recomputes each chunk's logits:
    d nll / d logits = softmax - onehot. The matmuls run in h's dtype (bf16 under
    --precision bf16), the softmax, the NLL and the weights' gradients in fp32."""
    chunk = 4096

    @staticmethod
    def logits(h, w, bias):   # (chunk, K) in the weights' dtype; w: the weights in h's dtype
        return torch.addmm(bias, h, w.t()) if h.dtype == bias.dtype else (h @ w.t()).to(bias.dtype) + bias

    @staticmethod
    def forward(ctx, h, weight, bias, target):
        nll = weight.new_empty(h.shape[0])
        w = weight.to(h.dtype)
        for s in range(0, h.shape[0], CategoricalHeadNLL.chunk):
            sl = slice(s, s + CategoricalHeadNLL.chunk)
            logp = torch.log_softmax(CategoricalHeadNLL.logits(h[sl], w, bias), -1)
            nll[sl] = -logp.gather(-1, target[sl, None]).squeeze(-1)
        ctx.save_for_backward(h, weight, bias, target)
        return nll

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, target = ctx.saved_tensors
        gh, gw, gb = torch.empty_like(h), torch.zeros_like(weight), torch.zeros_like(bias)
        w = weight.to(h.dtype)
        for s in range(0, h.shape[0], CategoricalHeadNLL.chunk):
            sl = slice(s, s + CategoricalHeadNLL.chunk)
            p = torch.softmax(CategoricalHeadNLL.logits(h[sl], w, bias), -1)
            p.scatter_add_(-1, target[sl, None], p.new_full((p.shape[0], 1), -1.0))
            p.mul_(grad[sl, None])
            ph = p.to(h.dtype)
            gh[sl] = ph @ w
            gw += (ph.t() @ h[sl]).to(gw.dtype)
            gb += p.sum(0)
        return gh, gw, gb, None


class _ConvTransposeFn(torch.autograd.Function):
    """F.conv_transpose2d with its weight gradient taken as the weight gradient of the ordinary
    convolution it transposes (input dy, output gradient x): oneDNN's kernel for that is faster on
    the CPU than its transposed-convolution one (docs/measurements.md); the same gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.conf = stride, padding
        return F.conv_transpose2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        (stride, padding), need = ctx.conf, ctx.needs_input_grad
        dx = F.conv2d(dy, weight, None, stride, padding) if need[0] else None
        dw = torch.ops.aten.convolution_backward(x, dy, weight, None, stride, padding, (1, 1), False, (0, 0), 1,
                                                 (False, True, False))[1] if need[1] else None
        return dx, dw, dy.sum((0, 2, 3)) if need[2] else None, None, None


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d (same parameters and state dict) whose backward on the CPU is
    _ConvTransposeFn's; elsewhere (cuDNN) the default."""

    def forward(self, x):
        if (x.device.type != 'cpu' or not torch.is_grad_enabled() or self.bias is None or self.groups != 1
                or self.dilation != (1, 1) or self.output_padding != (0, 0)):
            return super().forward(x)
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled('cpu') and x.dtype != torch.float64:   # as autocast casts a convolution's
            dtype = torch.get_autocast_dtype('cpu')
            x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
        with torch.autocast('cpu', enabled=False):
            return _ConvTransposeFn.apply(x, w, b, self.stride, self.padding)


def normal_log_interval(loc, scale, lo, hi):
    """log P(lo <= X < hi) for X ~ Normal(loc, scale) (lo may be -inf, hi inf), from log
    Phi on whichever side of the mean the interval lies, so upper tails keep their precision.
    Use float64. An interval too narrow to resolve gets its density times its width."""
    def standard(t):      # infinite edges as 1e6 std away: the same masses in float64, finite gradients
        return torch.where(t.isinf(), 1e6 * t.sign(), (torch.where(t.isinf(), 0.0, t) - loc) / scale).clamp(-1e6, 1e6)
    a, b = standard(lo), standard(hi)
    flip = a + b > 0      # above the mean: P = Phi(-a) - Phi(-b)
    big = torch.special.log_ndtr(torch.where(flip, -a, b))
    small = torch.special.log_ndtr(torch.where(flip, -b, a))
    out = log_sub_exp(big, small)
    lost = ~(small < big)
    if lost.any():     # rare: an end bin from its one tail, unclamped; another from its density at the middle
        end = lo.isinf() | hi.isinf()               # times its width (finite everywhere, differentiable)
        lo_f, hi_f = torch.where(lo.isinf(), hi, lo), torch.where(hi.isinf(), lo, hi)
        tail = torch.special.log_ndtr(torch.where(lo.isinf(), hi_f - loc, loc - lo_f) / scale)
        inner = Normal(loc, scale).log_prob((lo_f + hi_f) / 2) + (hi_f - lo_f).clamp(min=1e-300).log()
        out = torch.where(lost, torch.where(end, tail, inner), out)
    return out


def beta_log_interval(a, b, lo, hi):
    """log P(lo <= X < hi) for X ~ Beta(a, b), 0 <= lo < hi <= 1 (broadcast), float64, and
    differentiable in a and b. From the regularised incomplete beta I_x(a, b) at both edges;
    above the mean from the mirror image Beta(b, a) on [1 - hi, 1 - lo), so that upper tails
    keep their precision. Most bins come from loops compiled by torch.compile, with the
    derivatives carried through their series; the rest eagerly, with central differences."""
    if lo.requires_grad or hi.requires_grad:
        raise ValueError('beta_log_interval has no derivative in the edges of its interval')
    a, b, lo, hi = torch.broadcast_tensors(a, b, lo, hi)
    flat = [t.double().reshape(-1) for t in (a, b, lo, hi)]
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _BetaInterval.apply(*flat).view(a.shape)
    return _log_bins(*flat)[0].view(a.shape)                 # no derivatives wanted: none computed


# -----------------------------------------------------------------------------
# beta_log_interval's machinery: I_x(s, t) = x^s (1 - x)^t / (s B(s, t)) times a series (or a
# continued fraction) of positive terms, in log space, on the side of the mean below the bin


def _mirror(up, a, b, lo, hi):
    """Where up: Beta(b, a) and [1 - hi, 1 - lo), the mirror image of the bin, which holds the
    same mass in the lower tail; else Beta(a, b) and [lo, hi) as they are."""
    return (torch.where(up, b, a), torch.where(up, a, b), torch.where(up, 1 - hi, lo), torch.where(up, 1 - lo, hi))


def _log_prefactor(s, t, x, lb):
    """log(x^s (1 - x)^t / (s B(s, t))), 0 < x < 1, lb = log B(s, t)."""
    return s * x.log() + t * torch.log1p(-x) - s.log() - lb


def _log_beta(s, t):
    return torch.lgamma(s) + torch.lgamma(t) - torch.lgamma(s + t)


def _log_series_sum(c, d, x, terms=128):
    """log sum_n t_n with t_0 = 1, t_(n+1) = t_n (c + n x) / (d + n), for float64 vectors:
    each element stops once its terms fall below 1e-17 of its sum; nan where that takes more
    than `terms` terms, inf where the terms overflow."""
    out = torch.full_like(x, math.nan)
    live = torch.arange(len(x), device=x.device)
    d = d.clone()
    t, s, r = torch.ones_like(x), torch.ones_like(x), torch.empty_like(x)
    for n in range(terms):          # in place, few passes: this loop is most of the cost of the eager path
        torch.add(c, x, alpha=n, out=r).div_(d)
        d.add_(1)
        t.mul_(r)
        s.add_(t)
        last = n == terms - 1
        if n % 16 == 15 or last:
            stop = (t < 1e-17 * s) | (s == math.inf)
            if last or 4 * int(stop.sum()) >= len(live):    # compact once a quarter has stopped
                i, keep = stop.nonzero().squeeze(1), (~stop).nonzero().squeeze(1)
                out[live[i]] = s[i].log()
                live, x, c, d, t, s = (v.index_select(0, keep) for v in (live, x, c, d, t, s))
                r = torch.empty_like(x)
                if len(live) == 0:
                    break
    return out


def _log_betainc(a, b, x, log_beta=None, terms=128):
    """log I_x(a, b) for float64 tensors, 0 <= x <= 1: the prefactor plus the log of the 2F1
    series t_0 = 1, t_(n+1) = t_n x (a + b + n) / (a + 1 + n) (positive terms: no cancellation,
    no underflow in log space). log_beta: log B(a, b) where known. The few elements whose series
    needs more than `terms` terms (x near the mean of a peaked Beta) come from scipy's betainc."""
    a, b, x = torch.broadcast_tensors(a, b, x)
    shape = x.shape
    a, b, x = a.reshape(-1), b.reshape(-1), x.reshape(-1)
    lb = _log_beta(a, b) if log_beta is None else log_beta.expand(shape).reshape(-1)
    inner = (x > 0) & (x < 1)
    out = torch.where(x > 0, 0.0, -math.inf).double()     # I_0 = 0, I_1 = 1
    i = inner.nonzero().squeeze(1)
    if len(i) < len(x):
        a, b, x, lb = a[i], b[i], x[i], lb[i]
    log_sum = _log_series_sum(x * (a + b), a + 1, x, terms)
    li = _log_prefactor(a, b, x, lb) + log_sum
    hard = (~log_sum.isfinite()).nonzero().squeeze(1)
    if len(hard):
        from scipy.special import betainc
        with np.errstate(divide='ignore'):
            args = (v[hard].cpu().numpy() for v in (a, b, x))
            li[hard] = torch.from_numpy(np.log(betainc(*args))).to(li.device)
    out[i] = li
    return out.view(shape)


def _log_interval_eager(a, b, lo, hi):
    """beta_log_interval of flat float64 tensors without torch.compile (_log_betainc at both
    edges). A bin whose mass cannot be resolved gets its density at the middle times its width."""
    s, t, x0, x1 = _mirror(lo > a / (a + b), a, b, lo, hi)
    lb = _log_beta(a, b)
    j = (x0 > 0).nonzero().squeeze(1)         # the end bins' outer edge: I_0 = 0, not computed
    l = _log_betainc(torch.cat([s, s[j]]), torch.cat([t, t[j]]), torch.cat([x1, x0[j]]), torch.cat([lb, lb[j]]))
    l1, l0 = l[:len(s)], torch.full_like(s, -math.inf).index_put_((j,), l[len(s):])
    out = log_sub_exp(l1, l0)
    lost = ~(l0 < l1)
    if lost.any():      # not seen on trained models; finite rather than -inf
        mid = ((lo + hi) / 2).clamp(1e-300, 1 - 1e-16)
        out = torch.where(lost, Beta(a, b).log_prob(mid) + (hi - lo).log(), out)
    return out


class Fused:
    """An elementwise function compiled by torch.compile into one loop on first use (cached on
    disk by torch); it returns None instead where compiling fails (no C++ compiler, no Triton),
    and callers then take their eager path. The first failure in a process is said once."""
    fell_back = ''    # why torch.compile is not used ('' while it is)

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, *args):
        if self.fn is None:
            return None
        try:
            if self.compiled is None:
                if args[0].device.type == 'cpu' and not _cpp_compiler():
                    raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) for its CPU loops")
                # the CUDA build of torch on a machine without a GPU warns once that it has no CUDA runtime
                logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
                self.compiled = torch.compile(self.fn, dynamic=True)
            return self.compiled(*args)
        except Exception as e:   # torch raises many kinds (BackendCompilerFailed, OSError, ...)
            self.fn = None
            if not Fused.fell_back:
                import warnings
                Fused.fell_back = f'{type(e).__name__}: {str(e)[:200]}'
                warnings.warn(f'torch.compile cannot compile here ({Fused.fell_back}); the compiled loops '
                              f'run eagerly instead (the same numbers, slower)')
            return None


def _cpp_compiler():
    """The C++ compiler torch.compile builds CPU code with ($CXX, else g++), or None."""
    import shutil
    return shutil.which(os.environ.get('CXX', 'g++'))


def _log_gamma(x):
    """lgamma of float64 x > 0 from arithmetic and log alone, so that it vectorises in a fused
    loop (torch.lgamma does not): lgamma(x) = lgamma(x + 8) - log(x (x + 1) ... (x + 7)), with
    Stirling's series at x + 8 (its first omitted term is below 1e-15 there)."""
    small = x < 1e15          # the product stays finite; beyond, Stirling at x itself
    xs = torch.where(small, x, 1.0)
    prod = xs * (xs + 1) * (xs + 2) * (xs + 3) * (xs + 4) * (xs + 5) * (xs + 6) * (xs + 7)
    y = torch.where(small, xs + 8, x)
    r = 1 / y
    r2 = r * r
    series = r * (1 / 12 + r2 * (-1 / 360 + r2 * (1 / 1260 + r2 * (-1 / 1680 + r2 * (
        1 / 1188 + r2 * (-691 / 360360 + r2 / 156))))))
    out = (y - 0.5) * y.log() - y + 0.5 * math.log(2 * math.pi) + series
    return torch.where(small, out - prod.log(), out)


def _digamma(x):
    """torch.digamma of float64 x > 0 from arithmetic and log alone, for the fused loops as
    _log_gamma: psi(x) = psi(x + 8) - sum_k 1/(x + k), k = 0..7 (summed as one fraction), with the
    asymptotic series at x + 8 (its first omitted term is below 1e-15 there)."""
    small = x < 1e15
    xs = torch.where(small, x, 1.0)
    num, den = torch.zeros_like(xs), torch.ones_like(xs)
    for k in range(8):
        num, den = num * (xs + k) + den, den * (xs + k)
    y = torch.where(small, xs + 8, x)
    r = 1 / y
    r2 = r * r
    series = r2 * (1 / 12 - r2 * (1 / 120 - r2 * (1 / 252 - r2 * (1 / 240 - r2 * (
        1 / 132 - r2 * (691 / 32760 - r2 / 12))))))
    out = y.log() - r / 2 - series
    return torch.where(small, out - num / den, out)


def _log_series_terms(c, d, x, terms, grad=False):
    """_log_series_sum from a fixed number of terms, summed backwards (Horner) as a fraction U / V
    so the loop has no division (terms + 1 terms, t_0 to t_terms); nan where the rest may exceed
    1e-15 of the sum: the ratio of successive terms moves monotonically towards x, so the rest
    is at most t rho / (1 - rho), with t = t_terms and rho = max(the next ratio, x).
    grad: also the derivatives of that log in c and d (forward mode, carried through the same loop)."""
    u, v, t = torch.ones_like(x), torch.ones_like(x), torch.ones_like(x)
    if grad:
        uc, vc, ud, vd = (torch.zeros_like(x) for _ in range(4))
    for n in range(terms - 1, -1, -1):
        p, q = c + n * x, d + n
        if grad:     # d p / d c = 1, d q / d d = 1
            uc, vc, ud, vd = q * vc + u + p * uc, q * vc, v + q * vd + p * ud, v + q * vd
        u, v, t = q * v + p * u, q * v, p * t
        if n % 16 == 0:                       # rescale before the products overflow
            if grad:                          # (u / v)' = (u' - (u / v) v') / v
                uc, ud = (uc - u / v * vc) / v, (ud - u / v * vd) / v
                vc, vd = torch.zeros_like(v), torch.zeros_like(v)
            u, t, v = u / v, t / v, torch.ones_like(v)
    rho = torch.maximum((c + terms * x) / (d + terms), x)
    ok = (rho < 1) & (t * rho < 1e-15 * (1 - rho) * u)     # false for inf and nan
    out = torch.where(ok, u.log(), math.nan)
    return (out, uc / u, ud / u) if grad else out


def _series_log_i(s, t, x, lb, terms, psi=None):
    """log I_x(s, t) as in _log_betainc, for 0 <= x <= 1, from _log_series_terms (nan where its
    terms do not suffice), lb = log B(s, t). psi = (digamma(s), digamma(t), digamma(s + t)):
    also its derivatives in s and t (0 at x = 0 and 1, where I_x is 0 or 1)."""
    inner = (x > 0) & (x < 1)
    xs = torch.where(inner, x, 0.5)
    series = _log_series_terms(xs * (s + t), s + 1, xs, terms, grad=psi is not None)
    if psi is not None:
        series, dc, dd = series
    li = _log_prefactor(s, t, xs, lb) + series
    li = torch.where(inner, li, torch.where(x > 0, 0.0, -math.inf))
    if psi is None:
        return li
    ds = xs.log() - 1 / s - psi[0] + psi[2] + xs * dc + dd      # c = x (s + t), d = s + 1
    dt = torch.log1p(-xs) - psi[1] + psi[2] + xs * dc
    return li, torch.where(inner, ds, 0.0), torch.where(inner, dt, 0.0)


def _series_first(a, b, lo, hi, terms=32, grad=False):
    """log P of bins [0, hi) (lo = 0), whose lower edge needs no computing: log I_hi(a, b) from
    the series cut at `terms` terms, nan where those do not suffice. grad: also d/da and d/db.
    Elementwise only, for Fused, as _series_bins."""
    lb = _log_gamma(a) + _log_gamma(b) - _log_gamma(a + b)
    return _series_log_i(a, b, hi, lb, terms, (_digamma(a), _digamma(b), _digamma(a + b)) if grad else None)


def _series_bins(a, b, lo, hi, at_half, terms=48, grad=False):
    """_log_interval_eager from the series cut at `terms` terms, nan where those do not suffice
    or the difference of CDFs loses the bin. at_half (a 0-dim bool tensor): mirror above x = 1/2
    instead of above the mean, whose series converges faster for bins between the two; it then
    answers only for those bins, and only where the bin holds at least 1e-3 of the larger CDF
    (at most 1e-12 lost to the difference). grad: also d/da and d/db. Elementwise only, for Fused."""
    lb = _log_gamma(a) + _log_gamma(b) - _log_gamma(a + b)
    by_mean = lo > a / (a + b)
    up = torch.where(at_half, lo >= 0.5, by_mean)
    s, t, x0, x1 = _mirror(up, a, b, lo, hi)
    psi = None
    if grad:
        pa, pb = _digamma(a), _digamma(b)
        psi = (torch.where(up, pb, pa), torch.where(up, pa, pb), _digamma(a + b))
    e0, e1 = _series_log_i(s, t, x0, lb, terms, psi), _series_log_i(s, t, x1, lb, terms, psi)
    l0, l1 = (e0[0], e1[0]) if grad else (e0, e1)
    ok = (l0 < l1) & (~at_half | ((up != by_mean) & (l1 - l0 >= 1e-3)))
    out = torch.where(ok, log_sub_exp(l1, l0), math.nan)
    if not grad:
        return out
    rest = -torch.expm1(l0 - l1)            # d log(I_1 - I_0) = (d l1 - w d l0) / (1 - w), w = I_0 / I_1
    ds, dt = ((e1[k] - torch.exp(l0 - l1) * e0[k]) / rest for k in (1, 2))
    return out, torch.where(up, dt, ds), torch.where(up, ds, dt)


def _log_cf_terms(a, b, x, iters=24):
    """log of the continued fraction h with I_x(a, b) = x^a (1 - x)^b h / (a B(a, b)) (Numerical
    Recipes' betacf, modified Lentz), from a fixed number of iterations; fast for x below
    (a + 1) / (a + b + 2); nan where its last step still changes h by 1e-14 (or a denominator
    vanished: without Lentz's guards the loop stays small)."""
    c, d = torch.ones_like(x), 1 / (1 - (a + b) * x / (a + 1))
    h = delta = d
    for m in range(1, iters + 1):
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / (1 + coef * d)
            c = 1 + coef / c
            delta = d * c
            h = h * delta
    ok = ((delta - 1).abs() < 1e-14) & (h > 0) & h.isfinite()      # false for nan
    return torch.where(ok, h.log(), math.nan)


def _cf_bins(a, b, lo, hi):
    """_log_interval_eager from the continued fraction (_log_cf_terms, compiled, both edges in
    one call) instead of the series, for the bins the series misses (x near the mean of a peaked
    Beta): each edge takes I_x(a, b) below (a + 1) / (a + b + 2) and the mirror image above it;
    a bin across that point is 1 - I_lo - S_hi. nan where the fraction does not converge, None
    where compiling fails."""
    a2, b2, x = torch.cat([a, a]), torch.cat([b, b]), torch.cat([lo, hi])
    up = x > (a2 + 1) / (a2 + b2 + 2)
    s, t, y, _ = _mirror(up, a2, b2, x, x)
    inner = (y > 0) & (y < 1)
    ys = torch.where(inner, y, 0.5)
    cf = _cf_fused(s, t, ys)
    if cf is None:
        return None
    li = torch.where(inner, _log_prefactor(s, t, ys, _log_beta(s, t)) + cf, torch.where(y > 0, 0.0, -math.inf))
    (l0, l1), (up0, up1) = li.chunk(2), up.chunk(2)
    same = up0 == up1
    big, small = torch.where(up0, l0, l1), torch.where(up0, l1, l0)   # the bin is big - small
    across = torch.logaddexp(l0, l1)                                  # log (I_lo + S_hi)
    out = torch.where(same, log_sub_exp(big, small), log_sub_exp(torch.zeros_like(across), across))
    ok = torch.where(same, small < big, across < 0)      # false for nan
    return torch.where(ok, out, math.nan)


_first_fused, _bins_fused, _cf_fused = Fused(_series_first), Fused(_series_bins), Fused(_log_cf_terms)
_first_grad_fused = Fused(partial(_series_first, grad=True))       # the same, with derivatives
_bins_grad_fused = Fused(partial(_series_bins, grad=True))


def _log_bins(a, b, lo, hi, grad=False):
    """beta_log_interval of flat float64 tensors (N,), and with grad its derivatives (N, 2) in a
    and b, in passes compiled by torch.compile (Fused): the series at the one edge of the bins
    from 0 (most pixels), at both edges of the others on the mean's side, again at 1/2, then the
    continued fraction (values only). The bins they all miss, and every bin where compiling
    fails, are scored eagerly, their derivatives by central differences (_differences)."""
    out = torch.full_like(a, math.nan)
    deriv = torch.zeros(a.shape + (2,), dtype=a.dtype, device=a.device) if grad else None

    cols = torch.stack([a, b, lo, hi])      # (4, N): one gather per pass instead of four

    def run(loop, pick, *extra):
        i = pick.nonzero().squeeze(1)
        got = loop(*cols.index_select(1, i), *extra) if len(i) > 1 else None   # (1 element: a compile of its own)
        if got is not None and grad:
            out[i], deriv[i] = got[0], torch.stack(got[1:], -1)
        elif got is not None:
            out[i] = got
    first, bins = (_first_grad_fused, _bins_grad_fused) if grad else (_first_fused, _bins_fused)
    at0 = lo == 0
    run(first, at0)
    for at_half in (False, True):
        run(bins, out.isnan() & ~at0, torch.tensor(at_half, device=a.device))
    if not grad:
        run(_cf_bins, out.isnan())
    i = out.isnan().nonzero().squeeze(1)
    if len(i) and grad:
        out[i], deriv[i] = _differences(a[i], b[i], lo[i], hi[i])
    elif len(i):
        out[i] = _log_interval_eager(a[i], b[i], lo[i], hi[i])
    return out, deriv


def _differences(a, b, lo, hi, step=1e-3):
    """_log_bins and its derivatives (N, 2) in a and b by central differences in log a and log b
    (float64, step 1e-3: within 1e-5 of the derivative, test_beta_bin_gradient...), one call on 5N bins."""
    up, down = math.exp(step), math.exp(-step)
    f, a1, a0, b1, b0 = _log_bins(torch.cat([a, a * up, a * down, a, a]), torch.cat([b, b, b, b * up, b * down]),
                                  lo.repeat(5), hi.repeat(5))[0].view(5, -1)
    return f, torch.stack([(a1 - a0) / (a * (up - down)), (b1 - b0) / (b * (up - down))], -1)


class _BetaInterval(torch.autograd.Function):
    """_log_bins with a gradient in a and b: the forward pass computes the derivatives too."""

    @staticmethod
    def forward(ctx, a, b, lo, hi):
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        out, deriv = _log_bins(a, b, lo, hi, grad)
        ctx.save_for_backward(deriv if grad else None)
        return out

    @staticmethod
    def backward(ctx, g):
        (deriv,) = ctx.saved_tensors        # (N, 2)
        return g * deriv[:, 0], g * deriv[:, 1], None, None
