"""Convolutional VAE on MNIST with a choice of observation likelihood p(x|z).

Conventions, stated once for the whole project:
- Images are float tensors in [0, 1] of shape (B, 1, 28, 28). Every likelihood sees its
  data in that form (binarised, gray, dequantised or on its grid of levels); the same
  tensor is the encoder's input and the argument of log_prob.
- The decoder outputs per-pixel features; each likelihood owns a per-pixel linear head
  that turns them into unconstrained parameters (logits, locations, raw scales), applies
  the constraints, and returns a torch.distributions distribution over whole images, so
  log_prob sums over the 784 pixels and returns nats per image.
- Losses are per example (summed over pixels and latent dims) and averaged over the
  batch for the optimiser. Reported numbers are nats per image.
"""
import logging
import math
import os
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import (Bernoulli, Beta, Categorical, Distribution, Independent, MixtureSameFamily, Normal,
                                 constraints)
from torch.distributions.utils import broadcast_all

N_PIXELS = 784
LOG256 = math.log(256)
BITS = N_PIXELS * math.log(2)   # nats per image -> bits per pixel
EVAL_SEED = 1234  # fixed noise for validation/test binarisation and dequantisation
CKPT_FORMAT = 'conv-vae-likelihoods/1'
MNIST_SHA256 = {   # of the uncompressed files, as published with the data set's mirrors
    'train-images-idx3-ubyte': 'ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db',
    'train-labels-idx1-ubyte': '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5',
    't10k-images-idx3-ubyte': '0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7',
    't10k-labels-idx1-ubyte': 'ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2',
}
MNIST_FILES = tuple(MNIST_SHA256)

# -----------------------------------------------------------------------------
# data


class DataError(Exception):
    """The MNIST files are missing or unreadable; the message says what to do."""


def check_mnist_files(raw):
    """DataError naming the first of the four files in raw/ that is unreadable or not the
    original (SHA-256 of the uncompressed file: truncated, damaged or another data set)."""
    import hashlib
    for name, digest in MNIST_SHA256.items():
        path = os.path.join(raw, name)
        h = hashlib.sha256()
        try:
            with open(path, 'rb') as f:
                for block in iter(lambda: f.read(1 << 20), b''):
                    h.update(block)
        except OSError as e:
            raise DataError(f'cannot read {path}: {e.strerror}') from None
        if h.hexdigest() != digest:
            raise DataError(f'{path} is not the original MNIST file (its SHA-256 differs: truncated, damaged or '
                            f'another data set); replace it with the original') from None


def load_mnist(root):
    """MNIST as uint8 tensors: train = first 50,000 of the official training set,
    val = its last 10,000, test = the official 10,000. Images (N, 1, 28, 28), labels (N,).
    Downloaded into root/MNIST/raw/ if missing (directories made for a download that fails are
    removed again); the four files are checked against their published checksums."""
    raw = os.path.join(root, 'MNIST', 'raw')
    present = all(os.path.exists(os.path.join(raw, f)) for f in MNIST_FILES)
    made = [d for d in (root, os.path.dirname(raw), raw) if not os.path.isdir(d)]
    try:
        if not present:
            from torchvision import datasets       # only to download (its import takes a second)
            datasets.MNIST(root, train=True, download=True)
            datasets.MNIST(root, train=False, download=True)
        check_mnist_files(raw)
        files = {f: read_idx(os.path.join(raw, f)) for f in MNIST_FILES}
    except DataError:
        raise
    except BaseException as e:  # offline download, unreadable files, Ctrl-C during a download, ...
        for d in reversed(made):
            try:
                os.rmdir(d)          # only if empty: a partial download stays for the next try
            except OSError:
                pass
        if not isinstance(e, Exception):
            raise
        raise DataError(f"could not load or download MNIST ({type(e).__name__}); put the four "
                        f"files {', '.join(MNIST_FILES)} (uncompressed) into {raw}/") from e
    x, y = files['train-images-idx3-ubyte'].unsqueeze(1), files['train-labels-idx1-ubyte'].long()  # (60000, 1, 28, 28) uint8
    return {'train': (x[:50000], y[:50000]), 'val': (x[50000:], y[50000:]),
            'test': (files['t10k-images-idx3-ubyte'].unsqueeze(1), files['t10k-labels-idx1-ubyte'].long())}


def read_idx(path):
    """An uncompressed idx file of unsigned bytes (MNIST's format) as a uint8 tensor of its shape."""
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(dims)]
    return torch.frombuffer(data, dtype=torch.uint8, offset=4 + 4 * dims).view(shape)


# -----------------------------------------------------------------------------
# likelihoods p(x|z): one registry, each entry turns decoder output into a distribution


def positive(raw, floor):
    """Unconstrained -> (floor, inf): scales and concentrations never reach 0."""
    return F.softplus(raw) + floor


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


def bin_edges(x8):
    """8-bit values v (uint8) -> the edges of their bins [v/256, (v+1)/256), float64: the
    bins of uniform dequantisation (v + u)/256, which hold the gray value v/255 as well."""
    v = x8.double()
    return v / 256, (v + 1) / 256


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
    out = big + torch.log(-torch.expm1(small - big))
    lost = ~(small < big)
    if lost.any():     # rare: an end bin from its one tail, unclamped; another from its density at the middle
        end = lo.isinf() | hi.isinf()               # times its width (finite everywhere, differentiable)
        lo_f, hi_f = torch.where(lo.isinf(), hi, lo), torch.where(hi.isinf(), lo, hi)
        tail = torch.special.log_ndtr(torch.where(lo.isinf(), hi_f - loc, loc - lo_f) / scale)
        inner = Normal(loc, scale).log_prob((lo_f + hi_f) / 2) + (hi_f - lo_f).clamp(min=1e-300).log()
        out = torch.where(lost, torch.where(end, tail, inner), out)
    return out


def log_series_sum(c, d, x, terms=128):
    """log sum_n t_n with t_0 = 1, t_(n+1) = t_n (c + n x) / (d + n), for float64 vectors:
    each element stops once its terms fall below 1e-17 of its sum; nan where that takes more
    than `terms` terms, inf where the terms overflow."""
    out = torch.full_like(x, math.nan)
    live = torch.arange(len(x), device=x.device)
    d = d.clone()
    t, s, r = torch.ones_like(x), torch.ones_like(x), torch.empty_like(x)
    for n in range(terms):          # in place, few passes: this loop is most of the cost of scoring a Beta
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


def log_betainc(a, b, x, log_beta=None, terms=128):
    """log I_x(a, b), the regularised incomplete beta function, for float64 tensors, 0 <= x <= 1:
    a log x + b log(1 - x) - log a - log B(a, b) + log sum_n t_n with t_0 = 1,
    t_(n+1) = t_n x (a + b + n) / (a + 1 + n) (the 2F1 series: positive terms, so no
    cancellation, and no underflow in log space). log_beta: log B(a, b) where known. The few
    elements whose series needs more than `terms` terms (x near the mean of a peaked Beta) come
    from scipy's betainc (torch has none)."""
    a, b, x = torch.broadcast_tensors(a, b, x)
    shape = x.shape
    a, b, x = a.reshape(-1), b.reshape(-1), x.reshape(-1)
    lb = (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b) if log_beta is None
          else log_beta.expand(shape).reshape(-1))
    inner = (x > 0) & (x < 1)
    out = torch.where(x > 0, 0.0, -math.inf).double()     # I_0 = 0, I_1 = 1
    i = inner.nonzero().squeeze(1)
    if len(i) < len(x):
        a, b, x, lb = a[i], b[i], x[i], lb[i]
    log_sum = log_series_sum(x * (a + b), a + 1, x, terms)
    li = a * x.log() + b * torch.log1p(-x) - a.log() - lb + log_sum
    hard = (~log_sum.isfinite()).nonzero().squeeze(1)
    if len(hard):
        from scipy.special import betainc
        with np.errstate(divide='ignore'):
            args = (v[hard].cpu().numpy() for v in (a, b, x))
            li[hard] = torch.from_numpy(np.log(betainc(*args))).to(li.device)
    out[i] = li
    return out.view(shape)


def beta_log_interval(a, b, lo, hi):
    """log P(lo <= X < hi) for X ~ Beta(a, b), 0 <= lo < hi <= 1, from log I_x(a, b)
    (log_betainc, float64) at both edges. Above the mean it uses the survival side
    I_(1-x)(b, a), so upper tails keep their precision. A bin whose mass cannot be resolved
    gets its density at the middle times its width."""
    a, b, lo, hi = torch.broadcast_tensors(a, b, lo, hi)
    shape = a.shape
    a, b, lo, hi = (t.detach().double().reshape(-1) for t in (a, b, lo, hi))
    up = lo > a / (a + b)
    s, t = torch.where(up, b, a), torch.where(up, a, b)
    x0, x1 = torch.where(up, 1 - hi, lo), torch.where(up, 1 - lo, hi)
    lb = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    j = (x0 > 0).nonzero().squeeze(1)         # the end bins' outer edge: I_0 = 0, not computed
    l = log_betainc(torch.cat([s, s[j]]), torch.cat([t, t[j]]), torch.cat([x1, x0[j]]), torch.cat([lb, lb[j]]))
    l1, l0 = l[:len(s)], torch.full_like(s, -math.inf).index_put_((j,), l[len(s):])
    out = l1 + torch.log(-torch.expm1(l0 - l1))
    lost = ~(l0 < l1)
    if lost.any():      # not seen on trained models; finite rather than -inf
        mid = ((lo + hi) / 2).clamp(1e-300, 1 - 1e-16)
        out = torch.where(lost, Beta(a, b).log_prob(mid) + (hi - lo).log(), out)
    return out.view(shape)


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
                if args[0].device.type == 'cpu' and not cpp_compiler():
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


def cpp_compiler():
    """The C++ compiler torch.compile builds CPU code with ($CXX, else g++), or None."""
    import shutil
    return shutil.which(os.environ.get('CXX', 'g++'))


def log_gamma(x):
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


def digamma(x):
    """torch.digamma of float64 x > 0 from arithmetic and log alone, for the fused loops as
    log_gamma: psi(x) = psi(x + 8) - sum_k 1/(x + k), k = 0..7 (summed as one fraction), with the
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


def log_series_terms(c, d, x, terms, grad=False):
    """log_series_sum from a fixed number of terms, summed backwards (Horner) as a fraction U / V
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


def series_log_i(s, t, x, lb, terms, psi=None):
    """log I_x(s, t) as in log_betainc, for 0 <= x <= 1, from log_series_terms (nan where its
    terms do not suffice), lb = log B(s, t). psi = (digamma(s), digamma(t), digamma(s + t)):
    also its derivatives in s and t (0 at x = 0 and 1, where I_x is 0 or 1)."""
    inner = (x > 0) & (x < 1)
    xs = torch.where(inner, x, 0.5)
    series = log_series_terms(xs * (s + t), s + 1, xs, terms, grad=psi is not None)
    if psi is not None:
        series, dc, dd = series
    li = s * xs.log() + t * torch.log1p(-xs) - s.log() - lb + series
    li = torch.where(inner, li, torch.where(x > 0, 0.0, -math.inf))
    if psi is None:
        return li
    ds = xs.log() - 1 / s - psi[0] + psi[2] + xs * dc + dd      # c = x (s + t), d = s + 1
    dt = torch.log1p(-xs) - psi[1] + psi[2] + xs * dc
    return li, torch.where(inner, ds, 0.0), torch.where(inner, dt, 0.0)


def beta_params(raw, floor, grad):
    """a, b = softplus(raw) + floor (float64) from raw (N, 2), log B(a, b), and with grad the
    digammas series_log_i takes and d(a, b) / d raw."""
    a, b = (positive(raw[:, i].double(), floor) for i in (0, 1))
    lb = log_gamma(a) + log_gamma(b) - log_gamma(a + b)
    if not grad:
        return a, b, lb, None, None
    return a, b, lb, (digamma(a), digamma(b), digamma(a + b)), torch.sigmoid(raw.double())


def beta_bins_terms(raw, x8, floor, at_half, terms=48, grad=False):
    """Per pixel log P(x8 | a, b) of Beta(a, b), a, b = softplus(raw) + floor, raw (N, 2),
    x8 (N,): beta_log_interval with its series cut at `terms` terms, nan where those do not
    suffice or the difference of CDFs loses the bin. at_half (a 0-dim bool tensor): take the
    survival side above x = 1/2 instead of above the mean, whose series converges faster for
    bins between the two; it then answers only for those bins, and only where the bin holds at
    least 1e-3 of the larger CDF (at most 1e-12 lost to the difference). grad: also its
    derivatives in raw[:, 0] and raw[:, 1]. Elementwise only, for Fused."""
    a, b, lb, psi, dab = beta_params(raw, floor, grad)
    lo, hi = bin_edges(x8)
    by_mean = lo > a / (a + b)
    up = torch.where(at_half, lo >= 0.5, by_mean)
    s, t = torch.where(up, b, a), torch.where(up, a, b)
    x0, x1 = torch.where(up, 1 - hi, lo), torch.where(up, 1 - lo, hi)
    if grad:
        psi = (torch.where(up, psi[1], psi[0]), torch.where(up, psi[0], psi[1]), psi[2])
    e0, e1 = series_log_i(s, t, x0, lb, terms, psi), series_log_i(s, t, x1, lb, terms, psi)
    l0, l1 = (e0[0], e1[0]) if grad else (e0, e1)
    ok = (l0 < l1) & (~at_half | ((up != by_mean) & (l1 - l0 >= 1e-3)))
    rest = -torch.expm1(l0 - l1)            # the bin's share of I_x1
    out = torch.where(ok, l1 + torch.log(rest), math.nan)
    if not grad:
        return out
    w = torch.exp(l0 - l1)                  # d log(I_1 - I_0) = (d l1 - w d l0) / (1 - w)
    ds, dt = ((e1[k] - w * e0[k]) / rest for k in (1, 2))
    return out, torch.where(up, dt, ds) * dab[:, 0], torch.where(up, ds, dt) * dab[:, 1]


def log_cf_terms(a, b, x, iters=24):
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


def beta_bins_cf(a, b, lo, hi):
    """beta_log_interval from the continued fraction (log_cf_terms, compiled by Fused, both
    edges in one call) instead of the series, for the bins the series misses (x near the mean
    of a peaked Beta): each edge takes I_x(a, b) below (a + 1) / (a + b + 2) and the survival
    side above it; a bin across that point is 1 - I_lo - S_hi. nan where the fraction does not
    converge, None where compiling fails."""
    a2, b2, x = torch.cat([a, a]), torch.cat([b, b]), torch.cat([lo, hi])
    up = x > (a2 + 1) / (a2 + b2 + 2)
    s, t, y = torch.where(up, b2, a2), torch.where(up, a2, b2), torch.where(up, 1 - x, x)
    inner = (y > 0) & (y < 1)
    ys = torch.where(inner, y, 0.5)
    cf = _cf_fused(s, t, ys)
    if cf is None:
        return None
    li = s * ys.log() + t * torch.log1p(-ys) - s.log() - (torch.lgamma(s) + torch.lgamma(t) - torch.lgamma(s + t)) + cf
    li = torch.where(inner, li, torch.where(y > 0, 0.0, -math.inf))
    (l0, l1), (up0, up1) = li.chunk(2), up.chunk(2)
    same = up0 == up1
    big, small = torch.where(up0, l0, l1), torch.where(up0, l1, l0)   # the bin is big - small
    across = torch.logaddexp(l0, l1)                                  # log (I_lo + S_hi)
    out = torch.where(same, big + torch.log(-torch.expm1(small - big)), torch.log(-torch.expm1(across)))
    ok = torch.where(same, small < big, across < 0)      # false for nan
    return torch.where(ok, out, math.nan)


def beta_first_bin_terms(raw, floor, terms=32, grad=False):
    """beta_bins_terms for pixels at 0, whose bin [0, 1/256) has one edge to compute:
    log I_(1/256)(a, b) from the series cut at `terms` terms, nan where those do not suffice."""
    a, b, lb, psi, dab = beta_params(raw, floor, grad)
    out = series_log_i(a, b, torch.full_like(a, 1 / 256), lb, terms, psi)
    return (out[0], out[1] * dab[:, 0], out[2] * dab[:, 1]) if grad else out


_beta_bins_fused, _beta_first_fused, _cf_fused = Fused(beta_bins_terms), Fused(beta_first_bin_terms), Fused(log_cf_terms)
_beta_bins_grad_fused = Fused(partial(beta_bins_terms, grad=True))       # the same, with derivatives
_beta_first_grad_fused = Fused(partial(beta_first_bin_terms, grad=True))


class DiscretizedLogistic(Distribution):
    """Logistic(loc, scale) discretised to the 256 levels k/255 of an 8-bit pixel
    (PixelCNN++, Salimans et al. 2017): P(k) = F(k/255 + 1/510) - F(k/255 - 1/510),
    with the tails below level 0 and above level 255 folded into those levels.
    torch.distributions has no such distribution, so it is written here (and tested)."""
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
        # log(sigmoid(upper) - sigmoid(lower)), evaluated on the side of 0 where both
        # sigmoids are small (sigmoid(u) - sigmoid(l) = sigmoid(-l) - sigmoid(-u)).
        flip = upper + lower > 0
        a = torch.where(flip, -lower, upper)
        b = torch.where(flip, -upper, lower)
        la = F.logsigmoid(a)
        d = (F.logsigmoid(b) - la).clamp(max=-torch.finfo(la.dtype).tiny)
        middle = la + torch.log(-torch.expm1(d))
        first = F.logsigmoid(upper)   # level 0: P(X < 1/510)
        last = F.logsigmoid(-lower)   # level 255: P(X > 1 - 1/510)
        return torch.where(k <= 0, first, torch.where(k >= 255, last, middle))

    @property
    def mean(self):
        levels = torch.arange(256, dtype=self.loc.dtype, device=self.loc.device) / 255
        levels = levels.view((256,) + (1,) * self.loc.dim())  # (256, 1, ...)
        return (self.log_prob(levels).exp() * levels).sum(0)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
            u = u.clamp(1e-6, 1 - 1e-6)
            x = self.loc.expand(shape) + self.scale.expand(shape) * (u.log() - (-u).log1p())
            return (x * 255).round().clamp(0, 255) / 255


def images(base):
    """Treat the last three dims (1, H, W) as one event: log_prob sums over pixels.
    Argument validation is off on this hot path (it costs a third of a categorical step)."""
    return Independent(base, 3, validate_args=False)


def pixel(p):
    """One parameter channel (..., H, W) -> (..., 1, H, W), the layout of the images."""
    return p.unsqueeze(-3)


class _CategoricalHeadNLL(torch.autograd.Function):
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
        for s in range(0, h.shape[0], _CategoricalHeadNLL.chunk):
            sl = slice(s, s + _CategoricalHeadNLL.chunk)
            logp = torch.log_softmax(_CategoricalHeadNLL.logits(h[sl], w, bias), -1)
            nll[sl] = -logp.gather(-1, target[sl, None]).squeeze(-1)
        ctx.save_for_backward(h, weight, bias, target)
        return nll

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, target = ctx.saved_tensors
        gh, gw, gb = torch.empty_like(h), torch.zeros_like(weight), torch.zeros_like(bias)
        w = weight.to(h.dtype)
        for s in range(0, h.shape[0], _CategoricalHeadNLL.chunk):
            sl = slice(s, s + _CategoricalHeadNLL.chunk)
            p = torch.softmax(_CategoricalHeadNLL.logits(h[sl], w, bias), -1)
            p.scatter_add_(-1, target[sl, None], p.new_full((p.shape[0], 1), -1.0))
            p.mul_(grad[sl, None])
            ph = p.to(h.dtype)
            gh[sl] = ph @ w
            gw += (ph.t() @ h[sl]).to(gw.dtype)
            gb += p.sum(0)
        return gh, gw, gb, None


class Likelihood(nn.Module):
    """p(x|z) for one --dist: a per-pixel linear head (decoder features -> unconstrained
    parameters, `channels` per pixel) and `dist`, which applies the constraints and returns
    a torch.distributions distribution over whole images. Everything the scripts need to
    know about a likelihood is here, so a new one is a subclass and a registry line:
    - data(x8): the float images in [0, 1] it models (training, validation, test);
    - log_prob_8bit: its exact log-probability of the 8-bit test image (None: not defined);
    - density: a density on [0, 1] or R, scored by integrating it over each 8-bit bin;
    - scored: it has that score, so validation picks its checkpoint by it (else by its objective);
    - options: the train.py flags it takes; tag(): the run-name suffix they give;
    - clipped: its means and samples may leave [0, 1] (figures clip them);
    - diagnostics(): extra evaluation numbers, `diagnostic_columns` of likelihoods.csv."""
    channels = 1
    default_kl_weight = 1.0
    data_name = 'gray values'
    density = False
    scored = True         # has an exact 8-bit score, which then picks its checkpoint
    clipped = False
    loss_form = None      # the name of its own training loss (Likelihood.loss) where it has one
    options = ()
    before_options = {}   # what a checkpoint from before an option existed was trained with
    diagnostic_columns = ()

    def __init__(self, features, **_):
        super().__init__()
        self.head = nn.Linear(features, self.channels)

    def tag(self):
        """Suffix of the run name for options not at their defaults ('' here)."""
        return ''

    def data(self, x8, generator=None):
        """uint8 images (B, 1, 28, 28) -> the float images in [0, 1] this likelihood models."""
        return x8.float() / 255

    def dist(self, params):
        """Unconstrained params (..., H, W, C) -> distribution over images (..., 1, H, W)."""
        raise NotImplementedError

    def params(self, h):
        """Decoder features (..., H, W, F), fp32 or bf16 -> unconstrained params (..., H, W, C) in fp32."""
        return self.head(h.float())

    def forward(self, h):
        """Decoder features (..., H, W, F) -> p(x|z)."""
        return self.dist(self.params(h))

    def log_prob(self, h, x):
        """log p(x|z) of its data x, the term of the ELBO it trains on: (...,) nats per image."""
        return self(h).log_prob(x)

    def log_density(self, h, x):
        """log p(x|z) of any x in its support (a density's of dequantised images, for the bound)."""
        return self(h).log_prob(x)

    def training_note(self, iwae):
        """A line train.py prints where the loss is not what the flags suggest ('' if none)."""
        return f'note: --objective iwae trains it on its normalised log-density, not {self.loss_form}' if (
            iwae and self.loss_form) else ''

    def log_prob_8bit(self, h, x8, log_px):
        """Exact log P(x8 | z) of the 8-bit images x8 (B, 1, H, W), nats per image (..., B),
        given log_px = self.log_prob(h, x) on its data x of x8. Here: its data are the 256
        levels themselves, so that is it already."""
        return log_px

    def mean(self, h):
        return self(h).mean

    def sample(self, h):
        return self(h).sample()

    def loss(self, h, x, log_px, kl, kl_weight):
        """Per-example training loss (B,) from log_px = E_q[log p(x|z)] (mean over the L
        samples) and KL: the negative ELBO, with the KL weighted by kl_weight."""
        return -log_px + kl_weight * kl

    def diagnostics(self, model, x8):
        """Extra numbers for likelihoods.csv on the test images x8: {column: value}."""
        return {}

    def describe(self, row):
        """A sentence on its diagnostics in a row of likelihoods.csv ('' if none)."""
        return ''


FITS = {  # --fit: what a density trains on -> the name of that data
    'discrete': '8-bit levels',     # the exact mass of each 8-bit bin: what it is scored on
    'dequantised': 'dequantised',   # (v + u)/256: its ELBO bounds the 8-bit log-probability from below
    'gray': 'gray values',          # v/255, common practice: atoms at 0 and 1, an unbounded density
}


def levels(x):
    """Gray values v/255 (float) -> the 8-bit values v (uint8)."""
    return torch.round(x * 255).to(torch.uint8)


class DensityLik(Likelihood):
    """A density on [0, 1] (or R). Its 8-bit score is exact: P(v | z) is the integral of the
    density over v's bin [v/256, (v+1)/256) (log_interval), the mass outside [0, 1] going to
    the end bins; float64, summed over pixels. --fit chooses what it trains on (FITS): with
    'discrete' its log_prob is that exact score of the levels v/255 it is given."""
    density = True
    options = ('fit',)
    fits = tuple(FITS)   # the fits it offers, its default first
    before_options = {'fit': 'gray'}
    margin = 0.0      # gray values kept this far inside [0, 1] (a Beta's density is infinite at the ends)

    def __init__(self, features, fit=None, **_):
        super().__init__(features)
        fit = fit or self.fits[0]
        if fit not in self.fits:
            raise ValueError(f"{type(self).__name__} has no fit {fit!r}: it offers {', '.join(self.fits)}")
        self.fit, self.data_name = fit, FITS[fit]

    def tag(self):
        return '' if self.fit == self.fits[0] else f'-{self.fit}'

    def data(self, x8, generator=None):
        if self.fit == 'dequantised':
            return dequantize(x8, generator)
        x = x8.float() / 255
        return x.clamp(self.margin, 1 - self.margin) if self.margin else x

    def log_prob(self, h, x):
        return self.log_bins(h, levels(x)) if self.fit == 'discrete' else self(h).log_prob(x)

    def log_interval(self, params, lo, hi):
        """Per pixel log P(lo <= X < hi) (..., 1, H, W) from the head's params (..., H, W, C)."""
        raise NotImplementedError

    def log_bins(self, h, x8):
        """Exact log P(x8 | z) per image, differentiable (float64 inside, float32 out)."""
        lo, hi = bin_edges(x8)
        lo, hi = lo.masked_fill(x8 == 0, -math.inf), hi.masked_fill(x8 == 255, math.inf)
        return self.log_interval(self.params(h).double(), lo, hi).flatten(-3).sum(-1).float()

    def log_prob_8bit(self, h, x8, log_px=None):
        return log_px if self.fit == 'discrete' and log_px is not None else self.log_bins(h, x8)


class BernoulliLik(Likelihood):
    """Binarised pixels; training batches are re-binarised each time (dynamic binarisation).
    Binarised digits are another data set: no 8-bit score."""
    data_name = 'binarised'
    scored = False

    def data(self, x8, generator=None):
        return torch.bernoulli(x8.float() / 255, generator=generator)

    def dist(self, params):
        return images(Bernoulli(logits=pixel(params[..., 0]), validate_args=False))

    def log_prob_8bit(self, h, x8, log_px):
        return None


class ContinuousBernoulliLik(DensityLik):
    """Continuous Bernoulli, exact at any logit (ContinuousBernoulli above)."""
    diagnostic_columns = ('cb_gray_elbo_nats', 'cb_gray_bce_elbo_nats')

    def dist(self, params):
        return images(ContinuousBernoulli(pixel(params[..., 0]), validate_args=False))

    def log_interval(self, params, lo, hi):
        return ContinuousBernoulli(pixel(params[..., 0])).log_interval(lo.clamp(0, 1), hi.clamp(0, 1))

    @torch.inference_mode()
    def diagnostics(self, model, x8, batch=500):
        """ELBO on gray values x/255 with the normalised density, and with the unnormalised
        "Bernoulli on gray values" (binary cross-entropy) in its place: the gap is the normaliser."""
        gen = torch.Generator(x8.device).manual_seed(EVAL_SEED)
        proper = bce = 0.0
        for xb in x8.split(batch):
            x = xb.float() / 255
            h, mu, logvar = model(x, generator=gen)
            log_px, kl = self.log_density(h, x).mean(0), kl_normal(mu, logvar)   # the density, whatever its fit
            logits = pixel(self.params(h)[..., 0])
            log_bce = images(Bernoulli(logits=logits, validate_args=False)).log_prob(x).mean(0)
            proper += (log_px - kl).sum().item()
            bce += (log_bce - kl).sum().item()
        return {'cb_gray_elbo_nats': proper / x8.shape[0], 'cb_gray_bce_elbo_nats': bce / x8.shape[0]}

    def describe(self, row):
        return (f"{row['dist']} (seed {row['seed']}) on gray values: ELBO {row['cb_gray_elbo_nats']:.2f} nats with the "
                f"normalised density; {row['cb_gray_bce_elbo_nats']:.2f} with 'Bernoulli on gray values' "
                f"(unnormalised: not a log-probability; the missing normaliser is "
                f"{row['cb_gray_elbo_nats'] - row['cb_gray_bce_elbo_nats']:.2f} nats)")


class GaussianLik(DensityLik):
    """Normal with a learned per-pixel mean and std. The std is floored at 0.001 (0.256 bins, as
    the logistic's scale), on gray values at 0.01 (2.56 bins): there the density of the many
    exactly-0 pixels grows without bound as it shrinks. The mean is free, so the end bins, which
    reach to -inf and inf, can hold all of a pixel's mass."""
    channels = 2
    clipped = True

    @property
    def std_floor(self):
        return 1e-2 if self.fit == 'gray' else 1e-3

    def scale(self, params):
        return positive(pixel(params[..., 1]), self.std_floor)

    def dist(self, params):
        return images(Normal(pixel(params[..., 0]), self.scale(params), validate_args=False))

    def log_interval(self, params, lo, hi):
        base = self.dist(params).base_dist
        return normal_log_interval(base.loc, base.scale, lo, hi)


class SharedGaussianLik(GaussianLik):
    """Normal with a learned per-pixel mean and one learned std for every pixel and image
    (the sigma-VAE, Rybkin et al. 2021): the std a fixed-variance Gaussian would pick by hand."""
    channels = 1
    before_options = {}

    def __init__(self, features, **options):
        super().__init__(features, **options)
        self.raw_scale = nn.Parameter(torch.zeros(()))    # std softplus(0) + 0.01 = 0.70 at the start

    def scale(self, params):
        return positive(self.raw_scale.to(params.dtype), self.std_floor).expand(pixel(params[..., 0]).shape)


class FixedGaussianLik(GaussianLik):
    """Normal with a fixed std sigma; with --fit gray trained in the MSE form (KL weight
    lambda = sigma^2 / 784), otherwise on its normalised density like the others."""
    channels = 1
    options = ('sigma', 'fit')
    mse_form = 'the MSE form with KL weight lambda'

    def __init__(self, features, sigma=0.1, **options):
        super().__init__(features, **options)
        self.sigma = sigma
        if self.fit == 'gray':
            # lambda = 1/(beta N), beta = 1/sigma^2: the MSE-form loss is then the negative
            # ELBO times 2 sigma^2 / N, minus sigma^2 log(2 pi sigma^2).
            self.loss_form, self.default_kl_weight = self.mse_form, sigma ** 2 / N_PIXELS

    def tag(self):
        return ('' if self.sigma == 0.1 else f'-sigma{self.sigma:g}') + super().tag()

    def training_note(self, iwae):
        if self.fit != 'gray' and not iwae:
            what = 'its exact 8-bit bin masses' if self.fit == 'discrete' else 'its normalised density of them'
            return f'note: --fit {self.fit} trains gaussian-fixed on {what}, not {self.mse_form} (--fit gray)'
        return super().training_note(iwae)

    def scale(self, params):
        return torch.full_like(pixel(params[..., 0]), self.sigma)

    def loss(self, h, x, log_px, kl, kl_weight):
        """In the MSE form (--fit gray): mean over pixels of the squared error, averaged over
        the L samples, plus lambda * sum_j(-1 - log s_j^2 + mu_j^2 + s_j^2), which is lambda * 2 KL."""
        if self.loss_form is None:
            return super().loss(h, x, log_px, kl, kl_weight)
        mean = pixel(self.params(h)[..., 0])              # (L, B, 1, H, W)
        mse = (x - mean).pow(2).flatten(-3).mean(-1).mean(0)  # (B,)
        return mse + kl_weight * 2 * kl


def dequantize(x8, generator=None):
    """Uniform dequantisation (Theis et al. 2016): 8-bit v -> (v + u)/256, u ~ U[0, 1), which
    lies in v's bin [v/256, (v+1)/256); kept 1e-6 inside (0, 1), where float32 would round."""
    u = torch.rand(x8.shape, generator=generator, device=x8.device)
    return ((x8.float() + u) / 256).clamp(1e-6, 1 - 1e-6)


class BetaLik(DensityLik):
    """Beta(a, b), a, b = softplus + 0.001; on gray values kept 1e-6 inside (0, 1)."""
    channels = 2
    floor = 1e-3
    margin = 1e-6
    before_options = {'fit': 'dequantised'}

    def dist(self, params):
        a, b = (positive(pixel(params[..., i]), self.floor) for i in (0, 1))
        return images(Beta(a, b, validate_args=False))

    def log_interval(self, params, lo, hi):
        base = self.dist(params).base_dist
        return beta_log_interval(base.concentration1, base.concentration0, lo.clamp(0, 1), hi.clamp(0, 1))

    def log_bins(self, h, x8):
        """As DensityLik's, from the raw head outputs (per_pixel); differentiable through
        _BetaBinsGrad (torch has no derivative of the incomplete beta function in a or b)."""
        params = self.params(h)                                   # (..., B, H, W, 2)
        raw = params.reshape(-1, 2)                               # (N, 2)
        v = x8.squeeze(-3).expand(params.shape[:-1]).reshape(-1)  # (N,)
        out = (_BetaBinsGrad.apply(raw, v, self.per_pixel) if torch.is_grad_enabled() and raw.requires_grad
               else self.per_pixel(raw.detach().double(), v))   # float64 as in _BetaBinsGrad: one compiled graph
        return out.view(params.shape[:-3] + (-1,)).sum(-1).float()

    def per_pixel(self, raw, v, grad=False):
        """Exact log P(v | a, b) (N,) float64 of pixels with raw head outputs (N, 2) and levels v (N,),
        in passes compiled by torch.compile (Fused): the series at the one edge of the bins at 0
        (most pixels), at both edges of the others on the mean's side, again at 1/2, then the
        continued fraction; the eager path takes the bins all of them miss, and every bin where
        compiling fails. grad: also d/d raw (N, 2), carried through the series passes; the bins
        they miss get central differences of this exact score (_BetaBinsGrad.differences)."""
        out = torch.full(v.shape, math.nan, dtype=torch.float64, device=v.device)
        deriv = torch.zeros(v.shape + (2,), dtype=torch.float64, device=v.device) if grad else None
        side = {f: torch.tensor(f, device=raw.device) for f in (False, True)}
        first, bins = (_beta_first_grad_fused, _beta_bins_grad_fused) if grad else (_beta_first_fused, _beta_bins_fused)

        def ab_edges(i):      # Beta(a, b) and the bin [lo, hi) of pixels i, float64
            lo, hi = bin_edges(v[i])
            return (*(positive(raw[i, j].double(), self.floor) for j in (0, 1)), lo, hi.clamp(max=1))
        nonzero = v != 0         # most pixels are 0: their bin has one edge to compute, not two
        passes = ((lambda: ~nonzero, lambda i: first(raw[i], self.floor)),
                  (lambda: nonzero, lambda i: bins(raw[i], v[i], self.floor, side[False])),
                  (lambda: out.isnan() & nonzero, lambda i: bins(raw[i], v[i], self.floor, side[True])),
                  (lambda: out.isnan(), lambda i: None if grad else beta_bins_cf(*ab_edges(i))))
        for pick, run in passes:
            i = pick().nonzero().squeeze(1)
            got = run(i) if len(i) > 1 else None     # (torch.compile would compile again for 1 element)
            if got is not None and grad:
                out[i], deriv[i] = got[0], torch.stack(got[1:], -1)
            elif got is not None:
                out[i] = got
        i = out.isnan().nonzero().squeeze(1)
        if len(i) and grad:
            out[i], deriv[i] = _BetaBinsGrad.differences(self.per_pixel, raw[i], v[i])
        elif len(i):
            out[i] = beta_log_interval(*ab_edges(i))
        return (out, deriv) if grad else out


class _BetaBinsGrad(torch.autograd.Function):
    """per_pixel(raw, v) with a gradient: forward the exact scores and their derivative in each
    raw parameter (per_pixel's grad: forward mode through the series, central differences for
    the bins it misses)."""
    step = 1e-3

    @staticmethod
    def differences(per_pixel, raw, v):
        """per_pixel(raw, v) and its derivative by central differences in float64 (step 1e-3 in
        raw units: within 1e-5 of the derivative, test_beta_bin_gradient...), one call on 5N pixels."""
        r = raw.detach().double()
        d = torch.eye(2, dtype=r.dtype, device=r.device) * _BetaBinsGrad.step
        f, a1, a0, b1, b0 = per_pixel(torch.cat([r, r + d[0], r - d[0], r + d[1], r - d[1]]), v.repeat(5)).view(5, -1)
        return f, torch.stack([a1 - a0, b1 - b0], -1) / (2 * _BetaBinsGrad.step)

    @staticmethod
    def forward(ctx, raw, v, per_pixel):
        f, deriv = per_pixel(raw.detach().double(), v, grad=True)
        ctx.save_for_backward(deriv)
        ctx.dtype = raw.dtype
        return f

    @staticmethod
    def backward(ctx, grad):
        (deriv,) = ctx.saved_tensors        # (N, 2)
        return (grad[:, None] * deriv).to(ctx.dtype), None, None


class CategoricalLik(Likelihood):
    """Categorical over K levels: pixel value v in 0..255 falls in bin floor(v K / 256),
    represented in [0, 1] as bin / (K - 1). With K < 256 each bin's mass is spread
    uniformly over its 8-bit values in the 8-bit score."""
    options = ('bins',)

    def __init__(self, features, bins=256, **_):
        self.channels = self.bins = bins
        super().__init__(features)
        self.data_name = '8-bit levels' if bins == 256 else f'{bins} bins'
        # log of how many 8-bit values each bin holds (not a buffer: checkpoints stay as they are)
        self.log_bin_size = torch.bincount(torch.arange(256) * bins // 256, minlength=bins).float().log()

    def tag(self):
        return '' if self.bins == 256 else f'-K{self.bins}'

    def data(self, x8, generator=None):
        return torch.div(x8.long() * self.bins, 256, rounding_mode='floor').float() / (self.bins - 1)

    def dist(self, params):
        return images(Categorical(logits=params.unsqueeze(-4), validate_args=False))

    def log_prob(self, h, x):
        """Equals self(h).log_prob(bin index), through the fused head + normaliser."""
        target = torch.round(x * (self.bins - 1)).long().squeeze(-3).expand(h.shape[:-1])
        nll = _CategoricalHeadNLL.apply(h.reshape(-1, h.shape[-1]), self.head.weight,
                                        self.head.bias, target.reshape(-1))
        return -nll.view(h.shape[:-3] + (-1,)).sum(-1)  # (...,) nats per image

    def log_prob_8bit(self, h, x8, log_px):
        """log P(bin) - log(number of 8-bit values in the bin), per pixel."""
        if self.bins == 256:
            return log_px
        log_size = self.log_bin_size.to(x8.device)
        return log_px - log_size[x8.long() * self.bins // 256].flatten(-3).sum(-1)

    def mean(self, h):
        levels = torch.linspace(0, 1, self.bins, device=h.device)
        return (self(h).base_dist.probs * levels).sum(-1)

    def sample(self, h):
        return self(h).sample().float() / (self.bins - 1)


class LogisticLik(Likelihood):
    """Discretised logistic over the 256 levels of the 8-bit pixels."""
    channels = 2
    scale_floor = 1e-3
    data_name = '8-bit levels'

    def dist(self, params):
        loc, scale = pixel(params[..., 0]), positive(pixel(params[..., 1]), self.scale_floor)
        return images(DiscretizedLogistic(loc, scale, validate_args=False))


class LogisticMixLik(Likelihood):
    """A mixture of M discretised logistics per pixel over the 256 levels (PixelCNN++'s
    likelihood, here with independent pixels): M mixture logits, M locations, M scales."""
    scale_floor = 1e-3
    data_name = '8-bit levels'
    options = ('mixtures',)

    def __init__(self, features, mixtures=5, **_):
        self.mixtures, self.channels = mixtures, 3 * mixtures
        super().__init__(features)

    def tag(self):
        return '' if self.mixtures == 5 else f'-m{self.mixtures}'

    def dist(self, params):
        logits, loc, raw = params.unsqueeze(-4).chunk(3, -1)       # (..., 1, H, W, M) each
        comp = DiscretizedLogistic(loc, positive(raw, self.scale_floor), validate_args=False)
        return images(MixtureSameFamily(Categorical(logits=logits), comp, validate_args=False))


LIKELIHOODS = {  # --dist name -> likelihood class
    'bernoulli': BernoulliLik,
    'cbernoulli': ContinuousBernoulliLik,
    'gaussian': GaussianLik,
    'gaussian-shared': SharedGaussianLik,
    'gaussian-fixed': FixedGaussianLik,
    'beta': BetaLik,
    'categorical': CategoricalLik,
    'logistic': LogisticLik,
    'logistic-mix': LogisticMixLik,
}


def make_likelihood(name, features=16, **options):
    """The likelihood --dist names, given the options it takes (others are ignored)."""
    cls = LIKELIHOODS[name]
    return cls(features, **{k: options[k] for k in cls.options if k in options})


def eval_data(lik, x8):
    """The fixed version of a validation/test set: the same binarisation or dequantisation
    noise for every run and seed, drawn on the CPU so it does not depend on the device."""
    return lik.data(x8.cpu(), torch.Generator().manual_seed(EVAL_SEED)).to(x8.device)


# -----------------------------------------------------------------------------
# the VAE


PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16}  # --precision -> autocast dtype of the networks


def autocast(device, dtype):
    """Autocast of the conv nets to dtype on device; fp32 (a no-op) for dtype None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def reparameterize(mu, logvar, samples=1, generator=None):
    """z = mu + sigma * eps, eps ~ N(0, I): (B, D) -> (L, B, D)."""
    eps = torch.randn((samples,) + mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + (0.5 * logvar).exp() * eps


def kl_normal(mu, logvar):
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form (Kingma & Welling, App. B): (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)


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


class VAE(nn.Module):
    """Conv encoder -> q(z|x) = N(mu, diag(exp(logvar))); deconv decoder -> per-pixel
    features; the likelihood's head turns those into the parameters of p(x|z)."""
    features = 16  # per-pixel features handed to the likelihood's head

    def __init__(self, lik, latent_dim=32):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(True),   # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(True),  # (B, 64, 7, 7)
            nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.ReLU(True),
            nn.Linear(256, 2 * latent_dim))         # (B, 2D): mean and log-variance
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 256), nn.ReLU(True),
            nn.Linear(256, 64 * 7 * 7), nn.ReLU(True),
            nn.Unflatten(1, (64, 7, 7)),
            ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(True),             # (N, 32, 14, 14)
            ConvTranspose2d(32, self.features, 4, 2, 1), nn.ReLU(True))  # (N, 16, 28, 28)
        self.lik = lik
        # He initialisation: PyTorch's default shrinks the signal at each ReLU layer, the decoder
        # learns to ignore z and the posterior collapses (docs/measurements.md).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
                nn.init.zeros_(m.bias)
        # Convolutions in channels-last (NHWC) layout: faster on the CPU (docs/measurements.md);
        # decode's permute to (..., H, W, F) is then free.
        self.to(memory_format=torch.channels_last)

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)  # (B, D) each
        return mu, logvar

    def decode(self, z):
        """z (..., D) -> per-pixel features (..., 28, 28, 16), the input of self.lik."""
        h = self.decoder(z.flatten(0, -2))               # (N, 16, 28, 28)
        return h.permute(0, 2, 3, 1).unflatten(0, z.shape[:-1])

    def draw(self, x, samples=1, generator=None, dtype=None):
        """forward, also returning the draws z (L, B, D) themselves (for the IWAE bound)."""
        with autocast(x.device, dtype):
            mu, logvar = self.encode(x)
        mu, logvar = mu.float(), logvar.float()             # q(z|x), its noise and the KL in fp32
        z = reparameterize(mu, logvar, samples, generator)  # (L, B, D)
        with autocast(x.device, dtype):
            h = self.decode(z)
        return z, h, mu, logvar

    def forward(self, x, samples=1, generator=None, dtype=None):
        """x (B, 1, 28, 28) -> features h (L, B, 28, 28, 16), mu (B, D), logvar (B, D) (float32);
        with dtype (torch.bfloat16) the two networks run under autocast to it, h in that dtype."""
        z, h, mu, logvar = self.draw(x, samples, generator, dtype)
        return h, mu, logvar        # h in the networks' dtype: each likelihood computes in fp32 from it


def elbo_terms(model, x, samples=1, generator=None, dtype=None):
    """Per-image E_q[log p(x|z)] (mean over L samples) and KL (B,), and the features h.
    ELBO = log_px - kl, always with KL weight 1 and the likelihood's normalised log_prob of its
    data (a density's, or under --fit discrete its exact 8-bit bin masses)."""
    h, mu, logvar = model(x, samples, generator, dtype)
    return model.lik.log_prob(h, x).mean(0), kl_normal(mu, logvar), h


def log_prior_ratio(z, mu, logvar):
    """log p(z) - log q(z|x) of draws z (K, B, D) from q = N(mu, diag(exp(logvar))): (K, B)."""
    return Normal(0.0, 1.0).log_prob(z).sum(-1) - Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)


def iwae_terms(model, x, k, generator=None, dtype=None):
    """The k-sample importance-weighted bound on log p(x) (Burda et al. 2016) per image (B,),
    log mean_i p(x, z_i) / q(z_i|x) over k draws z_i ~ q(z|x), with the likelihood's normalised
    log-density; also the mean of log p(x|z_i) and the closed-form KL (B,), whose difference
    is the ELBO from the same draws."""
    z, h, mu, logvar = model.draw(x, k, generator, dtype)     # z (K, B, D), h (K, B, 28, 28, F)
    log_px = model.lik.log_prob(h, x)                         # (K, B)
    bound = torch.logsumexp(log_px + log_prior_ratio(z, mu, logvar), 0) - math.log(k)
    return bound, log_px.mean(0), kl_normal(mu, logvar)


# -----------------------------------------------------------------------------
# estimators of log p(x): importance sampling with the encoder as proposal

def chunk(device):
    """Decoder passes per call of the estimators: on a CPU few enough to stay in its caches,
    elsewhere enough to fill a GPU (not measured on one yet)."""
    return 256 if device.type == 'cpu' else 8192


@torch.inference_mode()
def log_weights(model, x, k, generator=None, x8=None, xdeq=None):
    """Importance weights log p(., z_i) - log q(z_i|x) of k draws z_i ~ q(z|x), x (B, 1, 28, 28)
    the likelihood's data: {'data': with log p(x|z); '8bit': with the exact log P(x8|z) of the
    8-bit images x8, where given and the likelihood has one; 'bound': with the dequantisation
    bound log p(xdeq|z) - 784 log 256, where xdeq is given}, each (k, B). Also the k-sample
    mean of log p(x|z) (B,), the closed-form KL (B,) and the posterior means (B, D)."""
    mu, logvar = model.encode(x)                          # (B, D)
    kc = max(1, min(k, chunk(x.device) // x.shape[0]))    # draws per decoder call
    lw, log_px = {}, 0.0
    for s in range(0, k, kc):
        z = reparameterize(mu, logvar, min(kc, k - s), generator)   # (c, B, D)
        h = model.decode(z)                                         # (c, B, 28, 28, F)
        log_prior = log_prior_ratio(z, mu, logvar)                  # (c, B)
        lpx = model.lik.log_prob(h, x)                              # (c, B)
        scores = {'data': lpx}
        if x8 is not None:
            scores['8bit'] = model.lik.log_prob_8bit(h, x8, lpx)
        if xdeq is not None:   # a dequantised density's own data is this dequantisation: its log p is lpx
            scores['bound'] = (lpx if xdeq is x else model.lik.log_density(h, xdeq)) - N_PIXELS * LOG256
        for key, lp in scores.items():
            if lp is not None:
                lw.setdefault(key, []).append(lp + log_prior)
        log_px = log_px + lpx.sum(0)
    return {key: torch.cat(v) for key, v in lw.items()}, log_px / k, kl_normal(mu, logvar), mu


def iwae(lw, k):
    """IWAE estimates of log p(x) from log weights (K, B), averaged over the K // k disjoint
    groups of k draws: (B,). Each is a lower bound on log p(x) in expectation, tighter as k grows."""
    groups = lw[: lw.shape[0] // k * k].view(-1, k, lw.shape[1])
    return (torch.logsumexp(groups, 1) - math.log(k)).mean(0)


def importance_log_px(model, x, k, generator=None, x8=None, xdeq=None):
    """log p by importance sampling (IWAE, k draws) for every image, in batches: a dict of
    (n,) estimates with the keys of log_weights; also the k-sample mean of log p(x|z), the
    closed-form KL (n,) and the posterior means (n, D)."""
    from tqdm import tqdm
    c = chunk(x.device)
    b = max(1, c // min(k, c))
    parts = []
    for s in range(0, x.shape[0], b):
        xb = x[s:s + b]        # xdeq is x: the same batch object, so log_weights reuses log p(x|z)
        parts.append((xb, None if x8 is None else x8[s:s + b],
                      None if xdeq is None else xb if xdeq is x else xdeq[s:s + b]))
    out = [log_weights(model, xb, k, generator, x8b, xdb)
           for xb, x8b, xdb in tqdm(parts, 'log p(x)', leave=False, disable=None)]
    lw, log_px, kl, mu = zip(*out)
    est = {key: iwae(torch.cat([w[key] for w in lw], 1), k) for key in lw[0]}
    return est, torch.cat(log_px), torch.cat(kl), torch.cat(mu)


def model_name(args, lik):
    """The likelihood, its options not at their defaults and the objective if not the ELBO,
    from a checkpoint's training arguments: 'categorical-K64', 'bernoulli-iwae5'."""
    iwae = f"-iwae{args['iw_samples']}" if args.get('objective') == 'iwae' else ''
    return args['dist'] + lik.tag() + iwae


def build(args):
    """The model (with its likelihood, model.lik) from a dict of training arguments,
    as stored in checkpoints."""
    lik = make_likelihood(args['dist'], VAE.features, **args)
    return VAE(lik, args['latent_dim'])


def read_torch_file(path, device='cpu'):
    """torch.load(weights_only=True), with any failure as a ValueError of one line saying which:
    a missing file, a truncated or non-PyTorch file, or a pickle weights_only=True refuses."""
    if not os.path.isfile(path):
        raise ValueError(f'{path}: no such checkpoint file')
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch.load raises UnpicklingError, RuntimeError, EOFError, ...
        if 'Unsupported global' in str(e):   # a pickle of arbitrary Python objects
            raise ValueError(f'{path} holds Python objects that torch.load(weights_only=True) refuses '
                             f'to unpickle: not a checkpoint of this project') from None
        raise ValueError(f'{path} is not a readable PyTorch file (truncated or not a checkpoint: '
                         f'{type(e).__name__})') from None


def load_checkpoint(path, device='cpu'):
    """A model.pt written by train.py -> (model in eval mode, checkpoint dict); anything else
    (see read_torch_file, or another project's checkpoint) raises ValueError."""
    ckpt = read_torch_file(path, device)
    if not isinstance(ckpt, dict) or ckpt.get('format') != CKPT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by this project's train.py")
    cls = LIKELIHOODS.get(ckpt['args']['dist'], Likelihood)
    model = build({**cls.before_options, **ckpt['args']})     # the options it trained with, where older than them
    model.load_state_dict(ckpt['state_dict'])
    return model.to(device).eval(), ckpt
