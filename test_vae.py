"""Fast tests, on small synthetic images (no MNIST, compiler or subprocess): every likelihood's
numerics against references (float64, quadrature, mpmath, scipy), its contract, shapes and
gradients, the objectives and estimators, the command lines and their errors. `make test-fast`
runs them; test_runs.py holds the slow tests."""
import argparse
import csv
import io
import math
import os
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import (Bernoulli, Beta, Categorical, ContinuousBernoulli, Independent,
                                 Normal, kl_divergence)

import compare_likelihoods as cmp
import compress
import constriction
import distributions as D
from conftest import (BENCH_TINY, HERE, bench_rows, beta_bins_of, beta_head_features, lik_of, metric_values, random_x8,
                      synthetic_images, untrained_judge)
import plot_latent
import quality
import rundir
import train
import utils
import vae

ALL = list(vae.LIKELIHOODS)

DENSITIES = [d for d in ALL if vae.LIKELIHOODS[d].density]

RECIPES = [(d, f) for d in DENSITIES for f in vae.LIKELIHOODS[d].fits]   # every density under every fit it offers

CHANNELS = {'bernoulli': 1, 'cbernoulli': 1, 'gaussian': 2, 'gaussian-shared': 1, 'gaussian-fixed': 1, 'beta': 2,
            'categorical': 256, 'logistic': 2, 'logistic-mix': 15}

REAL_LOAD_MNIST = utils.load_mnist   # before synthetic_mnist patches it

BETA_LOOPS = ('_first_fused', '_bins_fused', '_cf_fused')   # beta's compiled passes

# -----------------------------------------------------------------------------
# log-probabilities: against torch.distributions, and normalised


def reference(dist, params, x, lik):
    """Per-image log p(x) built directly from torch.distributions (params (..., H, W, C))."""
    p = [params[..., i].unsqueeze(-3) for i in range(params.shape[-1])]
    sp = lambda t, floor: F.softplus(t) + floor
    if dist == 'bernoulli':
        lp = Bernoulli(logits=p[0]).log_prob(x)
    elif dist == 'cbernoulli':
        lp = ContinuousBernoulli(logits=p[0]).log_prob(x)
    elif dist == 'gaussian':
        lp = Normal(p[0], sp(p[1], 1e-2)).log_prob(x)
    elif dist == 'gaussian-shared':
        lp = Normal(p[0], sp(lik.raw_scale, 1e-2)).log_prob(x)
    elif dist == 'gaussian-fixed':
        lp = Normal(p[0], lik.sigma).log_prob(x)
    elif dist == 'beta':
        lp = Beta(sp(p[0], 1e-3), sp(p[1], 1e-3)).log_prob(x)
    elif dist == 'categorical':
        lp = Categorical(logits=params.unsqueeze(-4)).log_prob(torch.round(x * (lik.bins - 1)).long())
    return lp.flatten(-3).sum(-1)


@pytest.mark.parametrize('dist', [d for d in ALL if not d.startswith('logistic')])
def test_log_prob_matches_torch_distributions(dist):
    """A density's log_prob on gray values (--fit gray) is its density's; with the raw std of
    gaussian-shared moved off its initial value, so its own parameter is the one used."""
    lik = lik_of(dist, **({'fit': 'gray'} if dist in DENSITIES else {}))
    if dist == 'gaussian-shared':
        lik.raw_scale.data.fill_(-1.5)
    x = lik.data(random_x8(5, 1, 6, 6))                    # (B, 1, H, W)
    h = torch.randn(3, 5, 6, 6, vae.VAE.features)          # (L, B, H, W, F)
    got = lik.log_prob(h, x)                               # categorical: the fused path
    want = reference(dist, lik.head(h), x, lik)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


def test_discretized_logistic_matches_cdf_differences():
    """Against the textbook form F(x + 1/510) - F(x - 1/510), the end levels taking the
    tails, in float64; where F is near 1 that difference cancels, so there the reference
    is the same mass from the survival function, S(x - 1/510) - S(x + 1/510)."""
    loc = torch.linspace(-0.5, 1.5, 41, dtype=torch.float64).view(-1, 1)
    scale = torch.tensor([0.003, 0.03, 0.3, 3.0], dtype=torch.float64).view(1, -1, 1)
    levels = torch.arange(256, dtype=torch.float64)
    got = D.DiscretizedLogistic(loc.unsqueeze(-1), scale).log_prob(levels / 255)  # (41, 4, 256)
    upper = torch.where(levels == 255, math.inf, (levels + 0.5) / 255)
    lower = torch.where(levels == 0, -math.inf, (levels - 0.5) / 255)
    cdf = lambda t: torch.sigmoid((t - loc.unsqueeze(-1)) / scale)
    sf = lambda t: torch.sigmoid(-(t - loc.unsqueeze(-1)) / scale)
    want = torch.where(cdf(upper) <= 0.5, torch.log(cdf(upper) - cdf(lower)), torch.log(sf(lower) - sf(upper)))
    ok = want > -30  # where float64 differences still hold digits
    assert ok.float().mean() > 0.5
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-6, atol=1e-6)
    assert torch.isfinite(got).all()


def logistic_mix_head(mixtures=3, n=40, seed=0):
    """A logistic-mix likelihood and decoder features giving n single pixels of varied mixtures."""
    torch.manual_seed(seed)
    lik = lik_of('logistic-mix', mixtures=mixtures)
    return lik, torch.randn(1, n, 1, 1, vae.VAE.features) * torch.logspace(-1, 1, n).view(1, n, 1, 1, 1)


def test_logistic_mixture_matches_its_mixed_cdf_differences():
    """Against log sum_m pi_m (F_m(x + 1/510) - F_m(x - 1/510)) in float64, the end levels taking the tails."""
    lik, h = logistic_mix_head()
    levels = torch.arange(256, dtype=torch.float64)
    got = lik.log_prob(h.expand(256, -1, -1, -1, -1), (levels / 255).float().view(256, 1, 1, 1, 1))   # (256, n)
    logits, loc, raw = lik.params(h).double().squeeze(0).flatten(0, -2).chunk(3, -1)   # (n, M) each
    scale = F.softplus(raw) + lik.scale_floor
    upper = torch.where(levels == 255, math.inf, (levels + 0.5) / 255).view(-1, 1, 1)
    lower = torch.where(levels == 0, -math.inf, (levels - 0.5) / 255).view(-1, 1, 1)
    mass = torch.sigmoid((upper - loc) / scale) - torch.sigmoid((lower - loc) / scale)      # (256, n, M)
    want = torch.log((torch.softmax(logits, -1) * mass).sum(-1))
    ok = want > -20                                   # where float64 differences still hold digits
    assert ok.double().mean() > 0.3
    torch.testing.assert_close(got.double()[ok], want[ok], rtol=1e-4, atol=1e-4)


def test_logistic_mixture_samples_follow_its_probabilities():
    lik, h = logistic_mix_head(n=3)
    draws = lik.sample(h.expand(100_000, -1, -1, -1, -1)).squeeze(-1).squeeze(-1).squeeze(-1)   # (100000, 3)
    assert torch.equal(draws, torch.round(draws * 255) / 255)          # on the grid
    levels = (torch.arange(256) / 255).view(256, 1, 1, 1, 1)
    p = lik.log_prob(h.expand(256, -1, -1, -1, -1), levels).exp().double()    # (256, 3)
    for j in range(3):
        freq = torch.bincount(torch.round(draws[:, j] * 255).long(), minlength=256).double() / draws.shape[0]
        assert (freq - p[:, j]).abs().max() < 0.006
    assert torch.allclose(lik.mean(h).flatten(), (p * levels.view(256, 1)).sum(0).float(), atol=1e-5)


@pytest.mark.parametrize('bins', [256, 7])
def test_categorical_samples_and_mean_follow_its_probabilities(bins):
    """The chunked inverse-CDF sample and mean against torch's Categorical of the same head:
    level frequencies of 100,000 draws, and the mean over more pixels than one chunk holds."""
    torch.manual_seed(0)
    lik = lik_of('categorical', bins=bins)
    h = torch.randn(1, 3, 1, 1, vae.VAE.features) * 2                       # 3 single pixels
    draws = lik.sample(h.expand(100_000, -1, -1, -1, -1)).flatten(1)       # (100000, 3)
    assert torch.equal(draws, torch.round(draws * (bins - 1)) / (bins - 1))     # on its grid
    p = lik(h).base_dist.probs.flatten(0, -2).double()                     # (3, K)
    for j in range(3):
        freq = torch.bincount(torch.round(draws[:, j] * (bins - 1)).long(), minlength=bins).double() / 1e5
        assert (freq - p[j]).abs().max() < 0.006
    h = torch.randn(2, 3, 28, 28, vae.VAE.features)                        # 4,704 pixels: two chunks
    want = (lik(h).base_dist.probs * torch.linspace(0, 1, bins)).sum(-1)   # (2, 3, 1, 28, 28)
    torch.testing.assert_close(lik.mean(h), want)


def test_discretized_logistic_mean_is_the_same_in_chunks():
    """Over more pixels than one chunk of the mean holds, each pixel's mean is its own alone
    (to float32 rounding: the sums run in another order)."""
    torch.manual_seed(0)
    d = D.DiscretizedLogistic(torch.rand(3, 2000) * 1.2 - 0.1, torch.rand(3, 2000) * 0.1 + 1e-3)
    one = torch.stack([D.DiscretizedLogistic(d.loc[i, j], d.scale[i, j]).mean
                       for i, j in [(0, 0), (1, 500), (2, 1999), (2, 96)]])
    torch.testing.assert_close(d.mean[[0, 1, 2, 2], [0, 500, 1999, 96]], one, rtol=0, atol=1e-6)


@pytest.mark.parametrize('loc,scale', [(0.5, 0.01), (0.02, 0.03), (1.1, 0.2)])
def test_discretized_logistic_samples_follow_its_probabilities(loc, scale):
    """Hand-written sample and mean agree with log_prob: level frequencies of 200,000
    draws match exp(log_prob), and mean matches the sample mean (end levels included)."""
    torch.manual_seed(0)
    d = D.DiscretizedLogistic(torch.tensor(loc), torch.tensor(scale))
    s = d.sample((200_000,))
    assert torch.equal(s, torch.round(s * 255) / 255)  # on the grid
    freq = torch.bincount(torch.round(s * 255).long(), minlength=256).double() / s.numel()
    p = d.log_prob(torch.arange(256) / 255).exp().double()
    assert (freq - p).abs().max() < 0.005
    assert abs(d.mean.item() - s.mean().item()) < 2e-3
    d64 = D.DiscretizedLogistic(torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64))
    levels = torch.arange(256, dtype=torch.float64) / 255       # the mean's sum of P(K >= k) is sum_k k P(k)
    assert abs(d64.mean.item() - (d64.log_prob(levels).exp() * levels).sum().item()) < 1e-12


@pytest.mark.parametrize('dist,bins', [('categorical', 256), ('categorical', 7), ('categorical', 2),
                                       ('logistic', 256), ('logistic-mix', 256)])
def test_discrete_likelihoods_sum_to_one(dist, bins):
    """Sum of p over every level of a single pixel is 1, through lik.log_prob (the path
    training uses), for many random heads including extreme parameters."""
    lik = lik_of(dist, bins=bins)
    levels = bins if dist == 'categorical' else 256
    h = torch.randn(1, 50, 1, 1, vae.VAE.features) * torch.logspace(-2, 2, 50).view(1, 50, 1, 1, 1)
    x = (torch.arange(levels, dtype=torch.float32) / (levels - 1)).view(levels, 1, 1, 1, 1)
    logp = lik.log_prob(h.expand(levels, -1, -1, -1, -1), x)   # (levels, 50)
    total = torch.logsumexp(logp.double(), 0).exp()
    torch.testing.assert_close(total, torch.ones(50, dtype=torch.float64), rtol=0, atol=2e-5)


def integrate(logpdf, lo, hi, n=400_001):
    t = torch.linspace(lo, hi, n, dtype=torch.float64)
    return torch.trapezoid(logpdf(t).exp(), t, dim=0)


@pytest.mark.parametrize('dist', ['cbernoulli', 'beta'])
def test_unit_interval_densities_integrate_to_one(dist):
    """Integral over [0, 1] of each pixel's density = 1, for 64 random parameter settings.
    Substituting x = sigmoid(y), dx = x (1 - x) dy, removes the Beta's end singularities.
    Beta concentrations stay >= 0.31 here: below that much of the mass lies within 1e-16
    of an end, closer than float64 can place x next to 1 (sigmoid(y) = 1 beyond y = 36.7)."""
    lik = lik_of(dist)
    gen = torch.Generator().manual_seed(0)
    if dist == 'beta':   # raw in [-1, 4]: concentrations in [0.31, 4.0]
        params = torch.rand(64, 1, 1, 2, generator=gen, dtype=torch.float64) * 5 - 1
    else:                # logits of all sizes; the density is bounded
        params = torch.randn(64, 1, 1, 1, generator=gen, dtype=torch.float64) * 4
    d = lik.dist(params)  # 64 one-pixel images

    def logpdf_y(y):
        x = torch.sigmoid(y).view(-1, 1, 1, 1, 1)
        return d.log_prob(x) + F.logsigmoid(y).view(-1, 1) + F.logsigmoid(-y).view(-1, 1)
    total = integrate(logpdf_y, -700.0, 36.7, n=200_001)
    torch.testing.assert_close(total, torch.ones(64, dtype=torch.float64), rtol=0, atol=1e-4)


@pytest.mark.parametrize('dist', ['gaussian', 'gaussian-fixed'])
def test_gaussian_densities_integrate_to_one(dist):
    """A Gaussian's support is the real line (it puts mass outside [0, 1]): integrate there."""
    lik = lik_of(dist)
    params = torch.randn(64, 1, 1, lik.channels, dtype=torch.float64)
    d = lik.dist(params)
    total = integrate(lambda t: d.log_prob(t.view(-1, 1, 1, 1, 1)), -15.0, 15.0, n=100_001)
    torch.testing.assert_close(total, torch.ones(64, dtype=torch.float64), rtol=0, atol=1e-5)


def test_fused_categorical_head_matches_linear_cross_entropy(monkeypatch):
    monkeypatch.setattr(D.CategoricalHeadNLL, 'chunk', 7)  # several chunks, a ragged last one
    torch.manual_seed(0)
    h = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (30,))
    g = torch.randn(30, dtype=torch.float64)
    got = D.CategoricalHeadNLL.apply(h, w, b, t)
    grads = torch.autograd.grad(got, (h, w, b), g)
    want = F.cross_entropy(F.linear(h, w, b), t, reduction='none')
    want_grads = torch.autograd.grad(want, (h, w, b), g)
    torch.testing.assert_close(got, want)
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(lambda *a: D.CategoricalHeadNLL.apply(*a, t), (h, w, b))


def test_fused_categorical_head_in_bf16_matches_fp32_within_bf16_rounding():
    """Under --precision bf16 the head's matmuls take bf16 features; the NLL and the weights'
    gradients stay fp32 and agree with the fp32 computation to bf16's precision."""
    torch.manual_seed(0)
    h = torch.randn(500, 16)
    w, b = torch.randn(256, 16) * 0.3, torch.randn(256) * 0.1
    t = torch.randint(0, 256, (500,))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        hh = h.to(dtype).requires_grad_()
        ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
        nll = D.CategoricalHeadNLL.apply(hh, ww, bb, t)
        assert nll.dtype == torch.float32
        out[dtype] = (nll, *torch.autograd.grad(nll.sum(), (hh, ww, bb)))
    assert [t.dtype for t in out[torch.bfloat16]] == [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    for got, want in zip(out[torch.bfloat16], out[torch.float32]):
        assert (got.float() - want).norm() / want.norm() < 2e-2


@pytest.mark.parametrize('dist', ALL)
def test_a_bf16_training_step_matches_fp32_and_keeps_the_sums_in_fp32(dist):
    """The same step under --precision bf16: the loss within 2 % of fp32's, fp32 log-likelihood
    and KL, finite gradients that reach the encoder."""
    x8 = random_x8(8, 1, 28, 28)
    losses = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = vae.build({'dist': dist, 'latent_dim': 4, 'bins': 256, 'sigma': 0.1})
        x = model.lik.data(x8, torch.Generator().manual_seed(0))
        log_px, kl, h = vae.elbo_terms(model, x, generator=torch.Generator().manual_seed(1), dtype=dtype)
        assert log_px.dtype == kl.dtype == torch.float32 and h.dtype == (dtype or torch.float32)
        loss = model.lik.loss(h, x, log_px, kl, model.lik.default_kl_weight).mean()
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert model.encoder[0].weight.grad.abs().sum() > 0
        losses[dtype] = loss.item()
    assert losses[torch.bfloat16] == pytest.approx(losses[None], rel=0.02)

# -----------------------------------------------------------------------------
# the Continuous Bernoulli from logits, and exact 8-bit scores of the densities


LOGITS = [-100.0, -30.0, -10.0, -1.0, -0.05, 0.0, 1e-3, 0.05, 1.0, 10.0, 30.0, 100.0]


def cb(e, dtype=torch.float64):
    return D.ContinuousBernoulli(torch.tensor(e, dtype=dtype))


@pytest.mark.parametrize('e', LOGITS)
def test_continuous_bernoulli_integrates_to_one_with_its_mean_and_cdf(e):
    """Quadrature (scipy, float64) of the density, of x p(x), and of p up to 0.3."""
    from scipy.integrate import quad
    d = cb(e)
    pdf = lambda x: d.log_prob(torch.tensor(x, dtype=torch.float64)).exp().item()  # noqa: E731
    pts = [1e-4, 1e-3, 1e-2, 0.1, 0.9, 0.99, 0.999, 1 - 1e-4]
    assert abs(quad(pdf, 0, 1, points=pts, limit=200)[0] - 1) < 1e-10
    assert abs(quad(lambda x: x * pdf(x), 0, 1, points=pts, limit=200)[0] - d.mean.item()) < 1e-10
    cdf = quad(pdf, 0, 0.3, points=[p for p in pts if p < 0.3], limit=200)[0]
    assert abs(d.cdf(torch.tensor(0.3, dtype=torch.float64)).item() - cdf) <= 1e-10 * cdf + 1e-300


@pytest.mark.parametrize('e', [-9.9, -5.0, -1.0, -0.3, -1e-3, 1e-3, 0.3, 1.0, 5.0, 9.9])
def test_continuous_bernoulli_equals_torch_in_float64_where_its_clamp_is_inactive(e):
    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    t = torch.tensor(e, dtype=torch.float64)
    ref = ContinuousBernoulli(logits=t)
    torch.testing.assert_close(D.ContinuousBernoulli(t).log_prob(x), ref.log_prob(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(D.ContinuousBernoulli(t).mean, ref.mean, rtol=1e-9, atol=1e-9)
    if abs(e) > 0.01:   # nearer 0 torch's cdf returns x itself, an approximation (ours: quadrature test)
        torch.testing.assert_close(D.ContinuousBernoulli(t).cdf(x), ref.cdf(x), rtol=1e-9, atol=1e-12)


def test_continuous_bernoulli_is_exact_at_logit_minus_30_in_float32_where_torch_is_not():
    """log p(0.002 | e = -30) = log(30 / (1 - exp(-30))) - 0.06 = 3.3411: torch's float32
    ContinuousBernoulli clamps the probability and returns 2.709; ours is exact in float32."""
    exact = math.log(30 / -math.expm1(-30)) - 30 * 0.002
    x = torch.tensor(0.002)
    ours = D.ContinuousBernoulli(torch.tensor(-30.0)).log_prob(x).item()
    theirs = ContinuousBernoulli(logits=torch.tensor(-30.0)).log_prob(x).item()
    assert abs(ours - exact) < 1e-5
    assert abs(theirs - exact) > 0.5        # the artefact this class replaces


def test_continuous_bernoulli_is_finite_with_gradients_at_large_logits_in_float32():
    e = torch.tensor([-100.0, -30.0, -1e-4, 0.0, 1e-4, 30.0, 100.0], requires_grad=True)
    x = torch.tensor([0.0, 0.3, 1.0])
    d = D.ContinuousBernoulli(e.view(-1, 1))
    lp = d.log_prob(x)
    (lp.sum() + d.mean.sum() + d.cdf(x).sum() + d.icdf(torch.full((7, 1), 0.3)).sum()).backward()
    assert torch.isfinite(lp).all() and torch.isfinite(e.grad).all()
    # at +-100 the density is 100 exp(100 (x - 1)) (or its mirror): log p(1) = log 100
    torch.testing.assert_close(lp[-1, -1], torch.tensor(math.log(100)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lp[0, 0], torch.tensor(math.log(100)), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize('e', [-100.0, -3.0, 0.0, 0.5, 30.0])
def test_continuous_bernoulli_samples_follow_its_cdf(e):
    """Inverse-CDF sampling: icdf(cdf(x)) = x, and 100,000 draws match the CDF (KS distance)."""
    d = cb(e)
    x = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    x = x[d.cdf(x) < 1 - 1e-9]             # where float64 still tells cdf(x) from 1
    torch.testing.assert_close(d.icdf(d.cdf(x)), x, rtol=1e-6, atol=1e-9)
    torch.manual_seed(0)
    s = d.sample((100_000,)).sort().values
    assert s.min() >= 0 and s.max() <= 1
    ks = (d.cdf(s) - torch.arange(1, 100_001, dtype=torch.float64) / 100_000).abs().max()
    assert ks < 0.006                       # the 99.9% KS critical value is 1.95 / sqrt(n)


def one_pixel_heads(n=40, seed=0):
    """n decoder features (n, 1, 1, F), from tame to extreme head outputs (up to the hundreds)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 1, vae.VAE.features, generator=gen) * torch.logspace(-1, 2.5, n).view(n, 1, 1, 1)


@pytest.mark.parametrize('dist', [d for d in ALL if vae.LIKELIHOODS[d].density])
def test_exact_8bit_bin_probabilities_of_every_density_sum_to_one(dist):
    """Through log_prob_8bit, the path the comparison uses: each of 40 one-pixel decoders
    (tame to extreme parameters) gives its 256 values probabilities summing to 1 (float64)."""
    lik = lik_of(dist)
    h = one_pixel_heads().unsqueeze(1).expand(-1, 256, -1, -1, -1)   # (40, 256, 1, 1, F)
    levels = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)  # 256 one-pixel images
    with torch.no_grad():
        logp = lik.log_prob_8bit(h, levels, None).double()             # (40, 256)
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-5)


def test_normal_bins_match_high_precision_cdf_differences():
    """normal_log_interval against mpmath at 50 digits, in both tails and the middle."""
    import mpmath
    mpmath.mp.dps = 50
    v = torch.arange(256)
    lo, hi = vae.bin_edges(v)
    lo, hi = lo.masked_fill(v == 0, -math.inf), hi.masked_fill(v == 255, math.inf)
    for loc, scale in [(0.5, 0.01), (0.02, 0.003), (0.98, 0.05), (-0.3, 0.1), (1.4, 0.2), (0.3, 30.0)]:
        got = D.normal_log_interval(torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64), lo, hi)
        F_ = lambda t: mpmath.ncdf(t, mu=loc, sigma=scale)            # noqa: E731
        S_ = lambda t: mpmath.ncdf(2 * loc - t, mu=loc, sigma=scale)  # noqa: E731 (survival: no cancellation)
        want = torch.tensor([float(mpmath.log(F_(h) - F_(lw) if h <= loc else S_(lw) - S_(h)))
                             for lw, h in zip(lo.tolist(), hi.tolist())], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('a,b,rtol', [(0.05, 3.0, 1e-9), (4.0, 4.0, 1e-9), (1e-3, 1e-3, 1e-9),
                                      (0.5, 300.0, 1e-6), (300.0, 0.5, 1e-6), (2000.0, 3000.0, 1e-6)])
def test_beta_bins_match_high_precision_quadrature(a, b, rtol):
    """beta_log_interval against mpmath in 30-digit arithmetic (no underflow): the end bins by
    the regularised incomplete beta, the others by tanh-sinh quadrature on 4 sub-intervals.
    The last three put bins below 1e-300, where scipy's betainc underflows and the series in
    log space takes over."""
    import mpmath
    mpmath.mp.dps = 30
    v = torch.tensor([0, 1, 2, 30, 127, 128, 200, 253, 254, 255])
    lo, hi = vae.bin_edges(v)
    got = D.beta_log_interval(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), lo, hi)
    pdf = lambda x: x ** (a - 1) * (1 - x) ** (b - 1) / mpmath.beta(a, b)  # noqa: E731
    mass = lambda lw, h: (mpmath.betainc(a, b, 0, h, regularized=True) if lw == 0 else  # noqa: E731
                          mpmath.betainc(b, a, 0, 1 - lw, regularized=True) if h == 1 else
                          mpmath.quad(pdf, mpmath.linspace(lw, h, 5)))
    want = torch.tensor([float(mpmath.log(mass(lw, h))) for lw, h in zip(lo.tolist(), hi.tolist())],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)


def test_log_betainc_matches_mpmath_in_every_regime():
    """log_betainc against mpmath at 40 digits: the series where its terms first grow (small x,
    large b: the background pixels' end bin), scipy's share (x near the mean of a peaked Beta),
    terms that overflow (I = 1 - tiny), the far lower tail where I itself underflows float64, and
    the edges x = 0 and 1."""
    import mpmath
    mpmath.mp.dps = 40
    cases = [(0.85, 2000.0, 1 / 256), (0.06, 1.7e-2, 1 / 256), (3.0, 1e4, 1 / 256), (1e-3, 1e-3, 0.3),
             (4.0, 4.0, 0.5), (2000.0, 2000.0, 0.497), (51.4, 9019.3, 0.47), (3000.0, 2000.0, 0.12),
             (1286.26, 30.13, 0.56), (2.5, 0.7, 0.0), (2.5, 0.7, 1.0)]
    a, b, x = (torch.tensor(c, dtype=torch.float64) for c in zip(*cases))
    got = D._log_betainc(a, b, x)
    def log_i(ai, bi, xi):                 # above the mean from the other side, where mpmath converges
        if xi == 0:
            return -math.inf
        if xi > ai / (ai + bi):
            return float(mpmath.log1p(-mpmath.betainc(bi, ai, 0, 1 - xi, regularized=True)))
        return float(mpmath.log(mpmath.betainc(ai, bi, 0, xi, regularized=True)))
    want = torch.tensor([log_i(*c) for c in cases], dtype=torch.float64)
    # near I = 1, log B(a, b) of large a + b cancels in the sum: a few 1e-12 nats absolute
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_continuous_bernoulli_bins_match_quadrature():
    from scipy.integrate import quad
    v = torch.tensor([0, 1, 17, 128, 254, 255])
    lo, hi = vae.bin_edges(v)
    for e in [-100.0, -30.0, -2.0, 0.0, 1e-6, 3.0, 50.0]:
        d = cb(e)
        got = d.log_interval(lo, hi)
        pdf = lambda x: d.log_prob(torch.tensor(x, dtype=torch.float64)).exp().item()  # noqa: E731
        want = torch.tensor([math.log(quad(pdf, lw, h, epsabs=0, epsrel=1e-13)[0])
                             for lw, h in zip(lo.tolist(), hi.tolist())], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_log_gamma_matches_torch_lgamma():
    x = torch.exp(torch.linspace(math.log(1e-3), math.log(1e20), 20001, dtype=torch.float64))
    x = torch.cat([x, torch.tensor([1.0, 2.0, 0.5, 1e15, 1e15 * (1 + 1e-15)], dtype=torch.float64)])
    torch.testing.assert_close(D._log_gamma(x), torch.lgamma(x), rtol=1e-14, atol=1e-14)


def test_fixed_series_equals_the_adaptive_one_where_it_says_it_is_enough():
    g = torch.Generator().manual_seed(0)
    n = 20000
    a, b = (torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-7, 9, generator=g)) for _ in range(2))
    x = torch.rand(n, generator=g, dtype=torch.float64)
    got = D._log_series_terms(x * (a + b), a + 1, x, 48)
    want = D._log_series_sum(x * (a + b), a + 1, x)
    ok = ~got.isnan()
    assert 0.3 < ok.double().mean() < 0.95          # both outcomes occur
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-14, atol=1e-14)


def eager_beta_score(lik, h, x8):
    """log P(x8 | z) per image of the beta head, from the eager score of every bin."""
    return D._log_interval_eager(*beta_bins_of(lik, h, x8)).view(h.shape[:-3] + (-1,)).sum(-1).float()


def test_continued_fraction_matches_scipy_betainc_where_it_converges():
    from scipy.special import betainc
    g = torch.Generator().manual_seed(0)
    n = 20000
    a, b = (torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-7, 9, generator=g)) for _ in range(2))
    x = torch.rand(n, generator=g, dtype=torch.float64) * (a + 1) / (a + b + 2)     # below the switch
    cf = D._log_cf_terms(a, b, x)
    got = a * x.log() + b * torch.log1p(-x) - a.log() - (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)) + cf
    want = torch.from_numpy(betainc(a.numpy(), b.numpy(), x.numpy())).log()
    ok = ~cf.isnan() & (want > -600)       # scipy's betainc loses digits near its underflow
    assert 0.5 < ok.double().mean() < 0.99          # both outcomes occur
    # lgamma of concentrations up to 8e3 carries an absolute error of 1e-11 into log B(a, b)
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-12, atol=5e-11)

SHORT_LOOPS = (partial(D._series_first, terms=8), partial(D._series_bins, terms=16),
               partial(D._log_cf_terms, iters=8))   # short, so that more bins reach every pass


def test_beta_8bit_score_through_its_passes_equals_the_exact_one(monkeypatch):
    """Each pass of BetaLik.log_prob_8bit (the loops torch.compile fuses, here run eagerly)
    equals beta_log_interval where it answers and leaves some bins to the next; so does the
    whole score."""
    monkeypatch.setattr(torch, 'compile', lambda fn, **_: fn)
    monkeypatch.setattr(D, '_cpp_compiler', lambda: 'g++')         # whether or not this machine has one
    for name, fn in zip(BETA_LOOPS, SHORT_LOOPS):
        monkeypatch.setattr(D, name, D.Fused(fn))
    lik, h, x8 = beta_head_features()
    fused = lik.log_prob_8bit(h, x8)
    a, b, lo, hi = beta_bins_of(lik, h, x8)
    exact = D._log_interval_eager(a, b, lo, hi)
    z = lo == 0
    first = D._first_fused(a[z], b[z], lo[z], hi[z])
    rest = [t[~z] for t in (a, b, lo, hi)]
    bins = D._bins_fused(*rest, torch.tensor(False))
    i = bins.isnan()
    again = D._bins_fused(*(t[i] for t in rest), torch.tensor(True))
    cf = D._cf_bins(a, b, lo, hi)
    for got, want in ((first, exact[z]), (bins, exact[~z]), (again, exact[~z][i]), (cf, exact)):
        ok = ~got.isnan()
        assert 0 < ok.sum() < ok.numel()            # each pass answers some bins, not all
        torch.testing.assert_close(got[ok], want[ok], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused, eager_beta_score(lik, h, x8), rtol=1e-7, atol=0)   # float32 sums


@pytest.mark.parametrize('fails', ['first call', 'second pass'])
def test_a_failed_compile_warns_once_and_scores_beta_eagerly(monkeypatch, fails):
    def broken(a, b, lo, hi, at_half):
        if fails == 'first call' or at_half:
            raise RuntimeError('no Triton')
        return D._series_bins(a, b, lo, hi, at_half)
    def also_broken(*a):
        raise RuntimeError('no Triton either')
    monkeypatch.setattr(D, '_bins_fused', D.Fused(broken))
    monkeypatch.setattr(D, '_first_fused', D.Fused(D._series_first))
    monkeypatch.setattr(D, '_cf_fused', D.Fused(also_broken))
    monkeypatch.setattr(torch, 'compile', lambda fn, **_: fn)     # the others run eagerly
    monkeypatch.setattr(D, '_cpp_compiler', lambda: 'g++')         # whether or not this machine has one
    lik, h, x8 = beta_head_features(2)
    with pytest.warns(UserWarning, match='torch.compile cannot compile here') as said:
        got = lik.log_prob_8bit(h, x8)
    assert len(said) == 1 and 'no Triton)' in str(said[0].message)       # the first failure only
    assert D._bins_fused(*[torch.ones(2, dtype=torch.float64)] * 4, torch.tensor(False)) is None
    torch.testing.assert_close(got, eager_beta_score(lik, h, x8))


def test_without_a_cpp_compiler_beta_scores_eagerly_and_says_so_once(monkeypatch):
    monkeypatch.setattr(D, '_cpp_compiler', lambda: None)                  # no g++, no $CXX
    def never(fn, **_):
        raise AssertionError('torch.compile was tried without a compiler')
    monkeypatch.setattr(torch, 'compile', never)
    for name, fn in zip(BETA_LOOPS, (D._series_first, D._series_bins, D._log_cf_terms)):
        monkeypatch.setattr(D, name, D.Fused(fn))
    lik, h, x8 = beta_head_features(2)
    with pytest.warns(UserWarning, match='no C\\+\\+ compiler') as said:
        got = lik.log_prob_8bit(h, x8)
    assert len(said) == 1
    torch.testing.assert_close(got, eager_beta_score(lik, h, x8))


def test_beta_one_one_scores_exactly_8_bits_per_dim():
    """Beta(1, 1) is uniform on [0, 1]: every 8-bit value gets 1/256, 8 bits/dim exactly (up to
    the float64 rounding of a difference of CDFs)."""
    v = torch.arange(256)
    lo, hi = vae.bin_edges(v)
    one = torch.ones((), dtype=torch.float64)
    torch.testing.assert_close(D.beta_log_interval(one, one, lo, hi), torch.full((256,), -math.log(256),
                                                                                 dtype=torch.float64), rtol=0, atol=1e-12)
    lik = lik_of('beta')
    with torch.no_grad():                  # a head whose concentrations are 1 (softplus(raw) + 0.001 = 1)
        lik.head.weight.zero_()
        lik.head.bias.fill_(math.log(math.expm1(1 - lik.floor)))
        x8 = random_x8(3, 1, 28, 28)
        bpd = -lik.log_prob_8bit(torch.randn(3, 28, 28, vae.VAE.features), x8, None) / (784 * math.log(2))
    torch.testing.assert_close(bpd, torch.full((3,), 8.0), rtol=0, atol=1e-5)


def test_registry_tables_match():
    """The per-likelihood tables of these tests and the Makefile's DISTS follow the registry."""
    assert set(CHANNELS) == set(vae.LIKELIHOODS)
    make = open(os.path.join(HERE, 'Makefile')).read()
    dists = next(line for line in make.splitlines() if line.startswith('DISTS ?='))
    assert dists.split('?=')[1].split() == list(vae.LIKELIHOODS)
    recipes = make.split('RECIPES ?=')[1].split('\n\n')[0].replace('\\\n', ' ').split('\n')[0].split()
    assert recipes == [f'{d}:{f}' for d, f in RECIPES if f != vae.LIKELIHOODS[d].fits[0]]   # each non-default fit

# -----------------------------------------------------------------------------
# training recipes of the densities (--fit), gaussian-shared, and what picks the checkpoint


def same_pixels_at_every_level(lik, seed=0):
    """Decoder features h (1, 256, 3, 3, F): nine random pixels, the same in all 256 images,
    and x8 (256, 1, 3, 3) with image v at level v: per pixel, the images hold every bin."""
    h = torch.randn(1, 1, 3, 3, vae.VAE.features, generator=torch.Generator().manual_seed(seed)) * 3
    x8 = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1).expand(256, 1, 3, 3)
    return h.expand(1, 256, 3, 3, -1), x8


@pytest.mark.parametrize('dist,fit', RECIPES)
def test_every_recipe_scores_bin_masses_that_sum_to_one(dist, fit):
    """The 8-bit score of every density under every fit it offers: over the 256 levels the
    masses of each pixel sum to 1 (the images' log-probabilities sum over pixels, so summed over
    levels they give 1 per pixel, nine pixels: logsumexp = 0 image-wise after dividing out)."""
    lik = lik_of(dist, fit=fit)
    h, x8 = same_pixels_at_every_level(lik)
    params = lik.params(h).double()
    lo, hi = vae.bin_edges(x8)
    per_pixel = lik.log_interval(params, lo.masked_fill(x8 == 0, -math.inf), hi.masked_fill(x8 == 255, math.inf))
    total = torch.logsumexp(per_pixel[0], 0)                          # (1, 3, 3): log of each pixel's total mass
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-9, rtol=0)
    with torch.no_grad():      # the score as evaluation takes it: from log_prob of its data (discrete: the same)
        got = lik.log_prob_8bit(h, x8, lik.log_prob(h, lik.data(x8, torch.Generator().manual_seed(0))))
        torch.testing.assert_close(got, per_pixel.flatten(-3).sum(-1).float())


@pytest.mark.parametrize('dist,fit', RECIPES)
def test_every_recipe_trains_with_finite_gradients(dist, fit):
    """One step of the training loss of every recipe on synthetic digits: finite, and every
    parameter of the likelihood and the networks gets a finite, non-zero gradient somewhere."""
    torch.manual_seed(0)
    model = vae.build({'dist': dist, 'latent_dim': 4, 'fit': fit})
    x = model.lik.data(synthetic_images(16, seed=1))
    log_px, kl, h = vae.elbo_terms(model, x)
    loss = model.lik.loss(h, x, log_px, kl, model.lik.default_kl_weight).mean()
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in model.lik.parameters())


@pytest.mark.parametrize('dist', [d for d in DENSITIES if 'discrete' in vae.LIKELIHOODS[d].fits])
def test_the_discrete_fit_trains_on_the_exact_bin_masses(dist):
    """--fit discrete: log_prob of the gray values v/255 is the exact 8-bit score of v, and
    differentiable; its data are the levels."""
    lik = lik_of(dist, fit='discrete')
    x8 = random_x8(4, 1, 5, 5)
    x = lik.data(x8)
    assert torch.equal(vae.levels(x), x8) and lik.data_name == '8-bit levels'
    h = torch.randn(2, 4, 5, 5, vae.VAE.features, requires_grad=True)
    got = lik.log_prob(h, x)
    want = lik_of(dist, fit='dequantised').log_prob_8bit(h, x8)    # the same head (seeded) and floors, another fit
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_old_checkpoints_keep_their_recipe(tmp_path):
    """A checkpoint from before --fit: the densities trained on gray values, beta dequantised."""
    assert lik_of('beta').fit == lik_of('gaussian').fit == 'discrete'
    old = {}
    for d in ('gaussian', 'cbernoulli', 'beta'):
        args = {'dist': d, 'latent_dim': 2}
        torch.save({'format': vae.CKPT_FORMAT, 'args': args, 'state_dict': vae.build(args).state_dict()}, tmp_path / d)
        old[d] = vae.load_checkpoint(str(tmp_path / d))[0].lik
    assert [lik.fit for lik in old.values()] == ['gray', 'gray', 'dequantised']
    assert rundir.model_name({'dist': 'gaussian'}, old['gaussian']) == 'gaussian-gray'
    assert rundir.model_name({'dist': 'beta'}, old['beta']) == 'beta-dequantised'


def eager_grad_loops(monkeypatch, terms=None):
    """Beta's derivative loops run eagerly (as torch.compile would run them), the value loops not
    at all (Fused(None), as in eager_beta); terms: shorter series, so that some bins fall through."""
    monkeypatch.setattr(torch, 'compile', lambda fn, **_: fn)
    monkeypatch.setattr(D, '_cpp_compiler', lambda: 'g++')         # whether or not this machine has one
    cut = {} if terms is None else {'terms': terms}
    monkeypatch.setattr(D, '_first_grad_fused', D.Fused(partial(D._series_first, grad=True, **cut)))
    monkeypatch.setattr(D, '_bins_grad_fused', D.Fused(partial(D._series_bins, grad=True, **cut)))


def test_digamma_matches_torch_over_every_scale():
    x = torch.exp(torch.linspace(math.log(1e-3), math.log(1e18), 2001, dtype=torch.float64))
    torch.testing.assert_close(D._digamma(x), torch.digamma(x), rtol=1e-13, atol=1e-12)


def test_series_derivatives_equal_autograd_of_the_series():
    """The forward-mode derivatives carried through the series loop (series_log_i with psi)
    equal autograd's derivative of the same float64 expression, in s and t, where it converges."""
    g = torch.Generator().manual_seed(0)
    s, t = (torch.exp(torch.empty(4000, dtype=torch.float64).uniform_(-6, 7, generator=g)).requires_grad_()
            for _ in range(2))
    x = torch.rand(4000, generator=g, dtype=torch.float64) * 0.6
    x[:100] = 0                                              # I_0 = 0: no derivative
    lb = torch.lgamma(s) + torch.lgamma(t) - torch.lgamma(s + t)
    value = D._series_log_i(s, t, x, lb, 48)
    ok = value.isfinite()
    assert 0.3 < ok[100:].double().mean() < 1                # the series converges for some, not all
    want = torch.autograd.grad(value[ok].sum(), (s, t))
    psi = tuple(torch.digamma(c.detach()) for c in (s, t, s + t))
    got, ds, dt = D._series_log_i(s.detach(), t.detach(), x, lb.detach(), 48, psi)
    torch.testing.assert_close(got[ok], value.detach()[ok], rtol=0, atol=0)
    assert (ds[:100] == 0).all() and (dt[:100] == 0).all()
    torch.testing.assert_close(ds[ok], want[0][ok], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dt[ok], want[1][ok], rtol=1e-9, atol=1e-9)


def test_beta_loops_derivatives_equal_autograd_of_their_values():
    """_series_first and _series_bins with grad: the bin from two CDFs and the mirror image's swap
    of a and b equal autograd of the same float64 expressions without grad, on every kind of bin
    and on both sides of the mean and of 1/2."""
    a, b, lo, hi = beta_bins_of(*beta_head_features())
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    loops = [lambda a, b, **g: D._series_first(a, b, lo, hi, **g)] + [
        lambda a, b, at=at, **g: D._series_bins(a, b, lo, hi, torch.tensor(at), **g) for at in (False, True)]
    for loop in loops:
        value = loop(a, b)
        ok = value.isfinite()
        assert ok.sum() > 100
        want = torch.stack(torch.autograd.grad(value[ok].sum(), (a, b)), -1)
        got = loop(a.detach(), b.detach(), grad=True)
        torch.testing.assert_close(got[0][ok], value.detach()[ok], rtol=0, atol=0)
        torch.testing.assert_close(torch.stack(got[1:], -1)[ok], want[ok], rtol=1e-8, atol=1e-9)


def test_beta_derivatives_from_the_loops_equal_central_differences(monkeypatch):
    """_log_bins(grad=True): its derivatives through the series passes (here shortened, so that
    bins reach the central differences too) agree with central differences of the exact score
    on every kind of bin, concentrations from 1e-3 to 1e4."""
    eager_grad_loops(monkeypatch, terms=8)
    a, b, lo, hi = beta_bins_of(*beta_head_features())
    f, deriv = D._log_bins(a, b, lo, hi, grad=True)
    z = lo == 0
    first = D._first_grad_fused(a[z], b[z], lo[z], hi[z])[0]
    bins = D._bins_grad_fused(a[~z], b[~z], lo[~z], hi[~z], torch.tensor(False))[0]
    assert first.isnan().any() and bins.isnan().any() and not first.isnan().all()   # both routes taken
    want_f, want = D._differences(a, b, lo, hi)
    torch.testing.assert_close(f, want_f, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, D._log_bins(a, b, lo, hi)[0], rtol=1e-10, atol=1e-10)
    # central differences carry an error of (1e-3)^2 / 6 times the third derivative
    torch.testing.assert_close(deriv, want, rtol=1e-4, atol=1e-5)

SERIES_CASES = [(0.05, 30.0, 0), (0.4, 3.0, 0), (5.0, 2.0, 170), (1.5, 900.0, 1), (0.002, 0.002, 128)]

PEAKED_CASES = [(2.0, 0.3, 255), (40.0, 60.0, 102), (300.0, 700.0, 77)]     # the series miss these


@pytest.mark.parametrize('a,b,v,route', [(*c, 'series') for c in SERIES_CASES]
                         + [(*c, 'differences') for c in SERIES_CASES + PEAKED_CASES])
def test_beta_bin_gradient_matches_high_precision_derivatives(monkeypatch, a, b, v, route):
    """--fit discrete for beta: d log P(v | a, b) / da and / db through beta_log_interval, against
    mpmath's derivative of its regularised incomplete beta in 30 digits: from the derivative
    loops where their series converge, by central differences of the eager score everywhere
    (the route a bin the loops miss takes)."""
    mpmath = pytest.importorskip('mpmath')
    mpmath.mp.dps = 30
    if route == 'series':
        eager_grad_loops(monkeypatch)
    ab = torch.tensor([[a, b]] * 2, dtype=torch.float64, requires_grad=True)    # two pixels: a loop takes at least two
    lo, hi = vae.bin_edges(torch.tensor([v, v], dtype=torch.uint8))
    hi = hi.clamp(max=1)
    got = D.beta_log_interval(ab[:, 0], ab[:, 1], lo, hi)
    got.sum().backward()
    if route == 'series':       # the loops answered: no central differences in this case
        args = (ab[:, 0].detach(), ab[:, 1].detach(), lo, hi)
        loop = (D._first_grad_fused(*args) if v == 0 else
                min((D._bins_grad_fused(*args, torch.tensor(h)) for h in (False, True)),
                    key=lambda t: int(t[0].isnan().sum())))
        assert not loop[0].isnan().any()
    lo, hi = mpmath.mpf(v) / 256, mpmath.mpf(v + 1) / 256

    def log_p(aa, bb):
        return mpmath.log(mpmath.betainc(aa, bb, lo, hi, regularized=True))
    a, b = mpmath.mpf(a), mpmath.mpf(b)
    assert float(got[0].detach()) == pytest.approx(float(log_p(a, b)), rel=1e-9, abs=1e-9)
    want = [float(mpmath.diff(lambda t: log_p(t, b), a)), float(mpmath.diff(lambda t: log_p(a, t), b))]
    torch.testing.assert_close(ab.grad[0], torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def best_masses(lik, v):
    """The largest mass a density gives level v over a grid of head outputs (0 and +-10^(k/2),
    k = 0..7, in every channel), any parameter of its own (gaussian-shared's std) at its floor."""
    vals = torch.tensor([0.0] + [s * 10 ** (k / 2) for k in range(8) for s in (1, -1)], dtype=torch.float64)
    grid = torch.cartesian_prod(*[vals] * lik.channels).view(1, 1, -1, lik.channels)   # (1, 1, G, C): a row of pixels
    with torch.no_grad():
        for p in lik.parameters():
            if p.dim() == 0:
                p.fill_(-1e4)
        lo, hi = vae.bin_edges(torch.tensor(v, dtype=torch.uint8))
        lo, hi = (-math.inf if v == 0 else lo.item()), (math.inf if v == 255 else hi.item())
        edge = torch.zeros(grid.shape[:-1], dtype=torch.float64)
        return lik.log_interval(grid, edge + lo, edge + hi).exp().max().item()


@pytest.mark.parametrize('dist', DENSITIES)
def test_every_density_can_put_999_of_a_pixel_in_the_first_bin_and_the_last(dist):
    """The floors on scales and concentrations leave room where most MNIST pixels are: some
    parameters put at least 0.999 of a pixel's mass into the bin of level 0, some into 255 (a
    Normal through its free mean; cbernoulli and beta through logits and concentrations)."""
    for fit in vae.LIKELIHOODS[dist].fits:
        lik = lik_of(dist, fit=fit)
        assert best_masses(lik, 0) >= 0.999 and best_masses(lik, 255) >= 0.999, fit


@pytest.mark.parametrize('dist', ['gaussian', 'gaussian-shared'])
def test_the_normal_std_floor_caps_an_interior_bin_only_on_gray_values(dist):
    """A Normal at the middle of level 128's bin with its std at the floor: under the fits to
    bins (0.256 bins) that level can hold 0.95 of the pixel, on gray values (2.56 bins) 0.15."""
    for fit, want in (('discrete', 0.9492), ('dequantised', 0.9492), ('gray', 0.1549)):
        lik = lik_of(dist, fit=fit)
        loc = torch.tensor([[128.5 / 256]], dtype=torch.float64)
        with torch.no_grad():
            if dist == 'gaussian-shared':
                lik.raw_scale.fill_(-1e4)
            params = torch.stack([loc, torch.full_like(loc, -1e4)], -1)[..., :lik.channels]   # (1, 1, C)
            lo, hi = vae.bin_edges(torch.tensor([[128]], dtype=torch.uint8))
            mass = lik.log_interval(params, lo, hi).exp().item()
        assert mass == pytest.approx(want, abs=1e-4), fit


def test_gaussian_shared_learns_one_std_the_root_mean_square_error():
    """gaussian-shared: one std for every pixel; its maximum-likelihood value for fixed means is
    the root mean square error (Rybkin et al. 2021), which gradient descent on it reaches."""
    lik = lik_of('gaussian-shared', fit='gray')
    h = torch.randn(8, 28, 28, vae.VAE.features)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        rmse = (x - lik.mean(h)).pow(2).mean().sqrt()
    assert [n for n, _ in lik.named_parameters()] == ['raw_scale', 'head.weight', 'head.bias']
    opt = torch.optim.Adam([lik.raw_scale], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        (-lik.log_prob(h, x).mean()).backward()
        opt.step()
    scale = lik(h).base_dist.scale
    assert scale.unique().numel() == 1
    assert scale.flatten()[0].item() == pytest.approx(rmse.item(), rel=1e-3)


def test_gaussian_fixed_trains_the_mse_form_only_on_gray_values(capsys):
    gray, discrete = lik_of('gaussian-fixed', fit='gray'), lik_of('gaussian-fixed')
    assert gray.loss_form and gray.default_kl_weight == pytest.approx(0.01 / 784)
    assert discrete.loss_form is None and discrete.default_kl_weight == 1.0
    assert 'trains gaussian-fixed on its exact 8-bit bin masses, not the MSE form' in discrete.training_note(False)
    assert 'on its normalised density of them' in lik_of('gaussian-fixed', fit='dequantised').training_note(False)
    assert 'normalised log-density' in gray.training_note(True) and gray.training_note(False) == ''

ROWS = [  # scripted validation: the ELBO best at epoch 2, the 8-bit score best at epoch 1
    {'val_elbo_nats': -100.0, 'val_nelbo_8bit_bpd': 2.0, 'val_iwae_nats': -99.0},
    {'val_elbo_nats': -90.0, 'val_nelbo_8bit_bpd': 2.5, 'val_iwae_nats': -89.0},
    {'val_elbo_nats': -95.0, 'val_nelbo_8bit_bpd': 2.2, 'val_iwae_nats': -88.0},    # the bound's best: epoch 3
]


@pytest.mark.parametrize('dist,objective,patience,picked,epochs', [
    ('gaussian', 'elbo', 0, 1, 3), ('gaussian', 'elbo', 1, 1, 2), ('gaussian-shared', 'iwae', 0, 1, 3),
    ('logistic', 'elbo', 0, 1, 3), ('bernoulli', 'elbo', 0, 2, 3), ('bernoulli', 'iwae', 0, 3, 3)])
def test_the_checkpoint_is_picked_by_the_8bit_score_bernoulli_by_its_objective(dist, objective, patience, picked,
                                                                               epochs, tmp_path, synthetic_mnist,
                                                                               monkeypatch):
    """With validation numbers where the ELBO and the 8-bit score disagree: every 8-bit
    likelihood keeps (and stops early by) the epoch of the best 8-bit score, bernoulli that of
    its best ELBO; metrics.csv and model.pt say which rule it was."""
    scripted = iter(ROWS)

    def evaluate(model, x, x8, **_):
        row = next(scripted)
        return {**row, 'val_recon_nats': 0.0, 'val_kl_nats': 0.0, 'eval_seconds': 0.0,
                'val_iwae_nats': row['val_iwae_nats'] if objective == 'iwae' else '',
                'val_nelbo_8bit_bpd': row['val_nelbo_8bit_bpd'] if model.lik.scored else ''}
    monkeypatch.setattr(train, 'evaluate', evaluate)
    out = tmp_path / 'run'
    train.train(train.parse_args(['--dist', dist, '--data-dir', synthetic_mnist, '--out-dir', str(out), '--subset', '64',
                                  '--batch-size', '64', '--latent-dim', '2', '--epochs', '3', '--objective', objective,
                                  '--iw-samples', '2', '--patience', str(patience)]))
    ckpt = torch.load(out / 'model.pt', weights_only=True)
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    rule = 'val_nelbo_8bit_bpd' if dist != 'bernoulli' else 'val_iwae_nats' if objective == 'iwae' else 'val_elbo_nats'
    assert (ckpt['epoch'], len(rows), ckpt['epochs_trained']) == (picked, epochs, epochs)
    assert ckpt['selected_by'] == rule and {r['selected_by'] for r in rows} == {rule}
    assert ckpt['val_selected'] == pytest.approx(float(rows[picked - 1][rule]))


def test_resume_refuses_a_run_that_picked_its_checkpoint_by_another_rule(tmp_path, synthetic_mnist):
    out = tmp_path / 'run'
    flags = ['--dist', 'gaussian', '--data-dir', synthetic_mnist, '--out-dir', str(out), '--subset', '64',
             '--batch-size', '64', '--latent-dim', '2', '--val-subset', '100']
    train.train(train.parse_args(flags + ['--epochs', '1']))
    state = torch.load(out / 'last.pt', weights_only=True)
    state['selected_by'] = 'val_elbo_nats'
    torch.save(state, out / 'last.pt')
    with pytest.raises(SystemExit, match='kept the epoch with the best val_elbo_nats, this one keeps the best '
                                         'val_nelbo_8bit_bpd'):
        train.train(train.parse_args(flags + ['--epochs', '2', '--resume']))
    state['selected_by'] = 'val_nelbo_8bit_bpd'
    del state['args']['fit']                                   # from before --fit: it trained on gray values
    torch.save(state, out / 'last.pt')
    with pytest.raises(SystemExit, match='written with --fit gray, this run has --fit discrete'):
        train.train(train.parse_args(flags + ['--epochs', '2', '--resume']))
    assert train.parse_args(['--dist', 'gaussian', '--fit', 'gray']).out_dir == os.path.join('runs', 'gray', 'gaussian-z32-s0')
    assert train.parse_args(['--dist', 'gaussian', '--fit', 'discrete']).out_dir == os.path.join('runs', 'gaussian-z32-s0')
    assert train.parse_args(['--dist', 'beta']).fit == 'discrete' and train.parse_args([]).fit is None

# -----------------------------------------------------------------------------
# data each likelihood sees


def test_data_transforms():
    x8 = random_x8(64, 1, 28, 28)
    x8[0, 0, :2, :2] = torch.tensor([[0, 255], [128, 127]], dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    b = lik_of('bernoulli')
    xb1, xb2 = b.data(x8, gen), b.data(x8, gen)
    assert set(xb1.unique().tolist()) == {0.0, 1.0} and not torch.equal(xb1, xb2)  # dynamic
    assert torch.equal(vae.eval_data(b, x8), vae.eval_data(b, x8))                # fixed for eval
    assert abs(xb1.mean() - x8.float().mean() / 255) < 0.01
    beta = lik_of('beta').data(x8, gen)
    assert (beta > 0).all() and (beta < 1).all()
    # stays in its pixel's bin [v/256, (v+1)/256] (float32 may round u -> 1 onto the upper edge)
    assert (beta >= x8 / 256).all() and (beta <= (x8.float() + 1) / 256).all()
    for dist in ['cbernoulli', 'gaussian', 'gaussian-fixed', 'logistic', 'categorical', 'logistic-mix']:
        assert torch.equal(torch.round(lik_of(dist).data(x8) * 255).to(torch.uint8), x8)
    two = lik_of('categorical', bins=2).data(x8)
    assert torch.equal(two, (x8 >= 128).float())
    four = lik_of('categorical', bins=4).data(x8)
    assert torch.equal(torch.round(four * 3).long(), x8.long() // 64)

# -----------------------------------------------------------------------------
# KL, shapes, gradients, the MSE form


def test_closed_form_kl_matches_torch():
    mu, logvar = torch.randn(16, 7) * 2, torch.randn(16, 7)
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    p = Independent(Normal(torch.zeros(7), torch.ones(7)), 1)
    torch.testing.assert_close(vae.kl_normal(mu, logvar), kl_divergence(q, p))


@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_the_decoders_transposed_convolution_equals_torchs_with_its_gradients(layout):
    """D.ConvTranspose2d (its own weight gradient on the CPU) against nn.ConvTranspose2d in
    float64: outputs and all three gradients, and torch's gradcheck of the backward."""
    torch.manual_seed(0)
    ours = D.ConvTranspose2d(6, 4, 4, 2, 1).double()
    ref = torch.nn.ConvTranspose2d(6, 4, 4, 2, 1).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    y, want = ours(x), ref(x)
    assert y.shape == (3, 4, 10, 10)
    g = torch.randn_like(want)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(y, (x, ours.weight, ours.bias), g), torch.autograd.grad(want, (x, ref.weight, ref.bias), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: D._ConvTransposeFn.apply(*a, (2, 2), (1, 1)), (x, ours.weight, ours.bias))


def test_the_decoders_transposed_convolution_under_bf16_autocast_matches_torchs():
    torch.manual_seed(0)
    ours = D.ConvTranspose2d(8, 4, 4, 2, 1)
    ref = torch.nn.ConvTranspose2d(8, 4, 4, 2, 1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 7, 7).to(memory_format=torch.channels_last).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y, want = ours(x.bfloat16()), ref(xr.bfloat16())        # its input bf16, as from the layer before
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want)
    y.float().sum().backward()
    want.float().sum().backward()
    assert ours.weight.grad.dtype == ours.bias.grad.dtype == torch.float32
    for a, b in ((ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad), (x.grad, xr.grad)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('n,nrow', [(16, 16), (64, 8), (10, 4), (3, 8)])
def test_image_grid_equals_torchvisions_make_grid(n, nrow):
    from torchvision.utils import make_grid
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1    # clamped to [0, 1]
    want = make_grid(x.clamp(0, 1), nrow=nrow, padding=2, pad_value=0.5)[0].numpy()
    got = utils.grid(x, nrow)
    assert got.shape == want.shape and (got == want).all()


def test_idx_files_are_read_with_their_shape(tmp_path):
    """MNIST's idx format: a magic number whose last byte is the number of dimensions, the sizes
    (big-endian), then the bytes."""
    x = random_x8(5, 28, 28)
    path = tmp_path / 'images-idx3-ubyte'
    path.write_bytes(bytes([0, 0, 8, 3]) + b''.join(d.to_bytes(4, 'big') for d in x.shape) + x.numpy().tobytes())
    got = utils.read_idx(str(path))
    assert got.dtype == torch.uint8 and torch.equal(got, x)


@pytest.mark.parametrize('latent_dim', [2, 32])
@pytest.mark.parametrize('dist', ALL)
def test_shapes(dist, latent_dim):
    model = vae.build({'dist': dist, 'latent_dim': latent_dim, 'bins': 256, 'sigma': 0.1})
    x = model.lik.data(random_x8(5, 1, 28, 28))
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, latent_dim)
    h, _, _ = model(x, samples=3)
    assert h.shape == (3, 5, 28, 28, vae.VAE.features)
    assert model.lik.head(h).shape == (3, 5, 28, 28, CHANNELS[dist])
    assert model.lik.log_prob(h, x).shape == (3, 5)
    for img in (model.lik.mean(h[0]), model.lik.sample(h[0])):
        assert img.shape == (5, 1, 28, 28)
    if not model.lik.clipped:
        s = model.lik.sample(h[0])
        assert s.min() >= 0 and s.max() <= 1


def test_categorical_bins_set_the_head():
    model = vae.build({'dist': 'categorical', 'latent_dim': 2, 'bins': 10, 'sigma': 0.1})
    assert model.lik.head.out_features == 10


@pytest.mark.parametrize('dist', ALL)
def test_reconstruction_gradient_reaches_encoder_through_z(dist):
    """Only the reconstruction term (no KL): it reaches the encoder only through
    z = mu + sigma * eps, so both the mean and the log-variance rows must get gradient."""
    model = vae.build({'dist': dist, 'latent_dim': 4, 'bins': 256, 'sigma': 0.1})
    x = model.lik.data(random_x8(8, 1, 28, 28))
    log_px, _, _ = vae.elbo_terms(model, x)
    (-log_px.mean()).backward()
    g = model.encoder[-1].weight.grad                     # (2D, 256): mu rows, then logvar rows
    assert g[:4].abs().sum() > 0 and g[4:].abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


@pytest.mark.parametrize('sigma', [0.1, 0.5])
def test_fixed_gaussian_mse_loss_is_affine_in_negative_elbo(sigma):
    """With lambda = sigma^2 / N: loss = (2 sigma^2 / N) (-ELBO) - sigma^2 log(2 pi sigma^2),
    per example, for the same draws of z (L = 3)."""
    torch.manual_seed(0)
    model = vae.build({'dist': 'gaussian-fixed', 'latent_dim': 8, 'sigma': sigma, 'fit': 'gray'})
    lik = model.lik
    x = lik.data(random_x8(16, 1, 28, 28))
    log_px, kl, h = vae.elbo_terms(model, x, samples=3, generator=torch.Generator().manual_seed(1))
    loss = lik.loss(h, x, log_px, kl, lik.default_kl_weight)
    a, b = 2 * sigma ** 2 / 784, -sigma ** 2 * math.log(2 * math.pi * sigma ** 2)
    torch.testing.assert_close(loss, a * -(log_px - kl) + b, rtol=1e-5, atol=1e-6)
    # a beta-VAE weight breaks the relation
    assert not torch.allclose(lik.loss(h, x, log_px, kl, 1.0), a * -(log_px - kl) + b, rtol=1e-3)

# -----------------------------------------------------------------------------
# data errors, the non-finite guard, and an end-to-end run


def test_unknown_dist_lists_the_valid_names(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(['--dist', 'poisson'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'poisson'" in err
    assert all(name in err for name in ALL)


def test_missing_data_gives_one_line(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setattr(torchvision.datasets.MNIST, 'mirrors', ['http://127.0.0.1:9/'])  # offline
    with pytest.raises(SystemExit) as e:
        train.train(train.parse_args(['--data-dir', str(tmp_path), '--out-dir', str(tmp_path / 'run')]))
    msg = str(e.value.code)
    assert msg.startswith('error: ') and '\n' not in msg
    assert all(f in msg for f in utils.MNIST_FILES) and str(tmp_path / 'MNIST' / 'raw') in msg
    assert not (tmp_path / 'run').exists() and os.listdir(tmp_path) == []   # no MNIST/raw/ left behind


def damaged_mnist(tmp_path, how):
    """The four MNIST files, damaged: the training images truncated, replaced by random pixels
    behind a valid header (it parses, and would train silently), or a directory (unreadable)."""
    raw = tmp_path / 'mnist' / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for f in utils.MNIST_FILES:
        (raw / f).write_bytes(bytes(64))
    images = raw / 'train-images-idx3-ubyte'
    header = (2051).to_bytes(4, 'big') + (60000).to_bytes(4, 'big') + (28).to_bytes(4, 'big') * 2
    if how == 'truncated':
        images.write_bytes(header + bytes(1000))
    elif how == 'corrupt':
        images.write_bytes(header + torch.randint(0, 256, (60000 * 784,), dtype=torch.uint8).numpy().tobytes())
    else:
        images.unlink()
        images.mkdir()
    return str(tmp_path / 'mnist')

BAD_INPUT = {   # case: (flags, what the one line must say)
    'unknown dist': (['--dist', 'poisson'], "invalid choice: 'poisson'"),
    'epochs 0': (['--epochs', '0'], '--epochs: 0 is outside [1, 100000]'),
    'epochs negative': (['--epochs', '-3'], '--epochs: -3 is outside [1, 100000]'),
    'batch size 0': (['--batch-size', '0'], '--batch-size: 0 is outside'),
    'batch size negative': (['--batch-size', '-256'], '--batch-size: -256 is outside'),
    'latent dim 0': (['--latent-dim', '0'], '--latent-dim: 0 is outside'),
    'latent dim negative': (['--latent-dim', '-2'], '--latent-dim: -2 is outside'),
    'samples 0': (['--samples', '0'], '--samples: 0 is outside'),
    'samples negative': (['--samples', '-1'], '--samples: -1 is outside'),
    'bins 1': (['--bins', '1'], '--bins: 1 is outside [2, 256]'),
    'bins 257': (['--bins', '257'], '--bins: 257 is outside [2, 256]'),
    'sigma 0': (['--sigma', '0'], '--sigma: 0.0 is outside [0.001, 1000.0]'),
    'sigma negative': (['--sigma', '-0.1'], '--sigma: -0.1 is outside [0.001, 1000.0]'),
    'sigma nan': (['--sigma', 'nan'], "--sigma: expected a finite number, got 'nan'"),
    'lr nan': (['--lr', 'nan'], "--lr: expected a finite number, got 'nan'"),
    'lr inf': (['--lr', 'inf'], "--lr: expected a finite number, got 'inf'"),
    'lr overflows': (['--lr', '1e400'], "--lr: expected a finite number, got '1e400'"),
    'lr too large': (['--lr', '5'], '--lr: 5.0 is outside (0, 1]'),
    'kl weight inf': (['--kl-weight=-inf'], "--kl-weight: expected a finite number, got '-inf'"),
    'kl weight huge': (['--kl-weight', '1e300'], '--kl-weight: 1e+300 is outside [0, 1000000.0]'),
    'seed negative': (['--seed', '-1'], '--seed: -1 is outside'),
    'seed too large': (['--seed', str(2 ** 64)], '--seed: 18446744073709551616 is outside'),
    'latent dim huge': (['--latent-dim', '1000000000000'], '--latent-dim: 1000000000000 is outside [1, 4096]'),
    'data dir missing': (['--data-dir', '{tmp}/nowhere'], 'could not load or download MNIST'),
    'MNIST truncated': (['--data-dir', '{truncated}'], 'train-images-idx3-ubyte is not the original MNIST file'),
    'MNIST random pixels': (['--data-dir', '{corrupt}'], 'train-images-idx3-ubyte is not the original MNIST file'),
    'MNIST unreadable': (['--data-dir', '{unreadable}'], 'cannot read'),
    'out-dir is a file': (['--out-dir', '{tmp}/a-file'], 'is a file, not a directory'),
    'out-dir not writable': (['--out-dir', '{readonly}/run'], '--out-dir {readonly}/run: cannot write there'),
    'resume without last.pt': (['--resume'], 'last.pt to resume from'),
    'resume and overwrite': (['--resume', '--overwrite'], 'choose one'),
    'fit of a discrete likelihood': (['--dist', 'categorical', '--fit', 'gray'],
                                     '--fit gray: categorical takes no --fit (an option of cbernoulli, gaussian, '),
    'option of another likelihood': (['--dist', 'gaussian', '--bins', '16'],
                                     '--bins 16: gaussian takes no --bins (an option of categorical)'),
    'unknown fit': (['--dist', 'gaussian', '--fit', 'exact'], "invalid choice: 'exact'"),
}


@pytest.mark.parametrize('case', list(BAD_INPUT))
def test_bad_input_is_one_line_and_overwrites_nothing(case, tmp_path, synthetic_mnist, monkeypatch, capsys):
    """train.py's command line, in-process: exit status non-zero, one line on stderr naming
    the problem, and no output directory made or file changed."""
    import torchvision
    if '{' in ' '.join(BAD_INPUT[case][0]) and 'out-dir' not in case:     # the data's own checks
        monkeypatch.setattr(utils, 'load_mnist', REAL_LOAD_MNIST)
    mnist_dir = synthetic_mnist
    monkeypatch.setattr(torchvision.datasets.MNIST, 'mirrors', ['http://127.0.0.1:9/'])  # offline
    flags, says = BAD_INPUT[case]
    (tmp_path / 'a-file').write_text('keep me')
    readonly = '/sys' if os.geteuid() == 0 else str(tmp_path / 'readonly')   # root ignores permissions
    if readonly != '/sys':
        (tmp_path / 'readonly').mkdir(mode=0o500)
    names = {'tmp': tmp_path, 'readonly': readonly,
             **{how: damaged_mnist(tmp_path / how, how) if case.startswith('MNIST') else ''
                for how in ('truncated', 'corrupt', 'unreadable')}}
    argv = ['--data-dir', mnist_dir, '--out-dir', str(tmp_path / 'run'), '--epochs', '1', '--subset', '128']
    argv += [f.format(**names) for f in flags]
    with pytest.raises(SystemExit) as e:
        train.train(train.parse_args(argv))
    code, err = e.value.code, capsys.readouterr().err
    msg = code if isinstance(code, str) else err.rstrip('\n')      # sys.exit('...') prints it, exit status 1
    says = says.format(**names)
    assert code != 0 and msg.count('\n') == 0 and 'error: ' in msg and says in msg, msg
    assert not (tmp_path / 'run').exists() and (tmp_path / 'a-file').read_text() == 'keep me'


@pytest.mark.parametrize('dist', ALL)
def test_log_prob_and_gradient_stay_finite_at_extreme_parameters(dist):
    """The floors and clamps: decoder features far out (head outputs in the hundreds) on
    black, white and random images give a finite log-likelihood and a finite gradient."""
    lik = lik_of(dist)
    x8 = torch.stack([torch.zeros(1, 28, 28, dtype=torch.uint8), torch.full((1, 28, 28), 255, dtype=torch.uint8),
                      random_x8(1, 28, 28)])
    x = lik.data(x8, torch.Generator().manual_seed(0))                 # (3, 1, 28, 28)
    for scale in (1.0, 100.0, 1000.0):
        h = (scale * torch.randn(1, 3, 28, 28, 16, generator=torch.Generator().manual_seed(1))).requires_grad_()
        lp = lik.log_prob(h, x)
        lp.sum().backward()
        assert torch.isfinite(lp).all() and torch.isfinite(h.grad).all(), (dist, scale)


def test_non_finite_loss_stops_and_keeps_the_last_good_epoch(tmp_path, monkeypatch, synthetic_mnist):
    calls = {'n': 0}
    real = vae.Likelihood.loss

    def poisoned(self, *a):
        calls['n'] += 1
        out = real(self, *a)
        return out * math.nan if calls['n'] == 3 else out  # 2 batches per epoch: epoch 2, batch 1
    monkeypatch.setattr(vae.Likelihood, 'loss', poisoned)
    out = tmp_path / 'run'
    args = train.parse_args(['--data-dir', synthetic_mnist, '--out-dir', str(out), '--subset', '256',
                             '--batch-size', '128', '--epochs', '3', '--latent-dim', '2'])
    with pytest.raises(SystemExit) as e:
        train.train(args)
    assert 'non-finite' in str(e.value.code) and 'epoch 2, batch 1/2' in str(e.value.code)
    assert 'keeps epoch 1 (best val ELBO' in str(e.value.code) and 'no model.pt' in str(e.value.code)
    assert not (out / 'model.pt').exists()             # an unfinished run is never published as done
    last = torch.load(out / 'last.pt', weights_only=True)
    assert last['epoch'] == 1 and last['best_epoch'] == 1 and last['best_state'] is not None


@pytest.mark.parametrize('dist,fit', [('categorical', None), ('gaussian', 'discrete'), ('gaussian', 'gray'),
                                      ('beta', 'discrete'), ('beta', 'dequantised')])
def test_the_8bit_validation_curve_is_the_exact_elbo_in_bits_per_dim(dist, fit):
    """val_nelbo_8bit_bpd = -(E_q log P(x8|z) - KL) / (784 ln 2) with the exact 8-bit score, from
    the same fixed-seed z: for categorical (256 levels) and a density fit to its bins the ELBO of
    val_elbo_nats; for a density on gray or dequantised values another number than that ELBO."""
    val8 = synthetic_images(300, seed=0)
    torch.manual_seed(0)
    model = vae.build({'dist': dist, 'latent_dim': 2, 'fit': fit}).eval()
    x = vae.eval_data(model.lik, val8)
    m = train.evaluate(model, x, val8, batch_size=300)
    with torch.no_grad():
        h, mu, logvar = model(x, generator=torch.Generator().manual_seed(vae.EVAL_SEED))
        log_p8 = vae.DensityLik.log_bins(model.lik, h, val8) if model.lik.density else \
            F.log_softmax(model.lik.params(h), -1).gather(-1, val8.long().squeeze(1)[None, ..., None]).sum((-3, -2, -1))
        want = -(log_p8 - vae.kl_normal(mu, logvar)).mean().item() / vae.BITS
    assert m['val_nelbo_8bit_bpd'] == pytest.approx(want, rel=1e-5)
    assert math.isclose(-m['val_elbo_nats'] / vae.BITS, want, rel_tol=1e-5) == (fit in (None, 'discrete'))


def test_precision_auto_follows_the_hardware_and_a_resume_keeps_the_runs_precision(tmp_path, monkeypatch, synthetic_mnist):
    out = tmp_path / 'run'
    flags = ['--data-dir', synthetic_mnist, '--out-dir', str(out), '--subset', '128', '--batch-size', '128', '--latent-dim', '2']
    monkeypatch.setattr(utils, 'native_bf16', lambda device: False)
    train.train(train.parse_args(flags + ['--epochs', '1']))
    assert torch.load(out / 'model.pt', weights_only=True)['args']['precision'] == 'fp32'
    monkeypatch.setattr(utils, 'native_bf16', lambda device: True)      # as if resumed on a bf16 machine
    train.train(train.parse_args(flags + ['--epochs', '2', '--resume']))
    assert torch.load(out / 'model.pt', weights_only=True)['args']['precision'] == 'fp32'
    train.train(train.parse_args(flags + ['--epochs', '1', '--overwrite']))
    assert torch.load(out / 'model.pt', weights_only=True)['args']['precision'] == 'bf16'
    with pytest.raises(SystemExit, match='written with --precision bf16, this run has --precision fp32'):
        train.train(train.parse_args(flags + ['--epochs', '2', '--resume', '--precision', 'fp32']))


def test_patience_stops_early_keeps_the_best_and_resume_honours_it(tmp_path, monkeypatch, synthetic_mnist):
    elbos = iter([-100.0, -99.0, -99.5, -99.7, -98.0, -97.0])
    real = train.evaluate
    monkeypatch.setattr(train, 'evaluate', lambda *a, **k: {**real(*a, **k), 'val_elbo_nats': next(elbos)})
    out = tmp_path / 'run'
    flags = ['--data-dir', synthetic_mnist, '--out-dir', str(out), '--subset', '128', '--batch-size', '128',
             '--latent-dim', '2', '--patience', '2']
    train.train(train.parse_args(flags + ['--epochs', '6']))
    ckpt = torch.load(out / 'model.pt', weights_only=True)
    assert ckpt['epoch'] == 2 and ckpt['epochs_trained'] == 4      # epochs 3 and 4 did not improve
    assert [r['epoch'] for r in csv.DictReader(open(out / 'metrics.csv'))] == ['1', '2', '3', '4']
    assert len(cmp.read_metrics(str(out), ckpt['epochs_trained'])) == 4
    train.train(train.parse_args(flags + ['--epochs', '10', '--resume']))   # still no better: no epoch trained
    assert [r['epoch'] for r in csv.DictReader(open(out / 'metrics.csv'))] == ['1', '2', '3', '4']
    train.train(train.parse_args(flags + ['--epochs', '6', '--resume', '--patience', '0']))  # patience may change
    assert torch.load(out / 'model.pt', weights_only=True)['epoch'] == 6

# -----------------------------------------------------------------------------
# interrupt, resume, determinism


def test_a_kill_while_writing_a_checkpoint_leaves_the_old_one_whole(tmp_path, monkeypatch):
    path = str(tmp_path / 'model.pt')
    utils.save_torch({'w': torch.zeros(1000)}, path)
    real_save = torch.save

    def killed_halfway(obj, f):         # writes half of the file, then the process "dies"
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        utils.save_torch({'w': torch.ones(1000)}, path)
    assert torch.equal(torch.load(path, weights_only=True)['w'], torch.zeros(1000))
    assert os.listdir(tmp_path) == ['model.pt']          # the half-written temporary file is gone

# -----------------------------------------------------------------------------
# the IWAE objective (train.py --objective iwae)


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return vae.VAE(lik_of('bernoulli'), latent_dim=4)


def test_iwae_with_one_sample_is_the_elbo_of_its_draw_and_equals_the_elbo_on_average():
    model, x = tiny_vae(), torch.bernoulli(torch.full((8, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(1))
    bound, log_px, kl = vae.iwae_terms(model, x, 1, torch.Generator().manual_seed(2))
    mu, logvar = model.encode(x)       # the same draw again: z = mu + sigma eps with the same eps
    z = vae.reparameterize(mu, logvar, 1, torch.Generator().manual_seed(2))
    single = model.lik.log_prob(model.decode(z), x)[0] + vae.log_prior_ratio(z, mu, logvar)[0]
    torch.testing.assert_close(bound, single)
    torch.testing.assert_close(log_px - kl, model.lik.log_prob(model.decode(z), x)[0] - vae.kl_normal(mu, logvar))
    with torch.no_grad():              # over many draws, the K = 1 loss is the negative ELBO
        runs = [vae.iwae_terms(model, x, 1, torch.Generator().manual_seed(s)) for s in range(400)]
        draws, elbo = torch.stack([r[0] for r in runs]), torch.stack([r[1] - r[2] for r in runs])
    gap = (draws - elbo).mean(0)       # the single-draw KL estimate minus the closed form: mean 0
    assert (gap.abs() < 4 * (draws - elbo).std(0) / 20).all()


def test_the_k_sample_bound_is_above_the_elbo_and_grows_with_k():
    model, x = tiny_vae(), torch.bernoulli(torch.full((16, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        means = {}
        for k in (1, 5, 50):
            runs = [vae.iwae_terms(model, x, k, torch.Generator().manual_seed(s)) for s in range(20)]
            means[k] = torch.stack([r[0] for r in runs]).mean().item()
        elbo = torch.stack([r[1] - r[2] for r in runs]).mean().item()
    assert elbo < means[5] < means[50] and means[1] < means[5]
    assert means[1] == pytest.approx(elbo, abs=0.02 * abs(elbo))


def test_an_iwae_step_reaches_the_encoder_and_reports_the_elbo():
    model = tiny_vae()
    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)     # lr 0: the weights stay, the gradients remain
    torch.manual_seed(5)
    loss, elbo = train.train_step(model, opt, x, train.parse_args(['--objective', 'iwae', '--iw-samples', '5']))
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    torch.manual_seed(5)                                  # the same draws: the loss is the bound, the ELBO the ELBO
    bound, log_px, kl = vae.iwae_terms(model, x, 5)
    torch.testing.assert_close(loss, -bound.mean().detach())
    torch.testing.assert_close(elbo, (log_px - kl).detach())
    assert bound.mean() > elbo.mean()


def test_train_with_the_iwae_objective_records_it_and_resume_refuses_a_change(tmp_path, synthetic_mnist):
    out = tmp_path / 'run'
    flags = ['--data-dir', synthetic_mnist, '--out-dir', str(out), '--subset', '128', '--batch-size', '64',
             '--latent-dim', '2', '--objective', 'iwae', '--iw-samples', '3']
    train.train(train.parse_args(flags + ['--epochs', '1']))
    ckpt = torch.load(out / 'model.pt', weights_only=True)
    assert ckpt['args']['objective'] == 'iwae' and ckpt['args']['iw_samples'] == 3
    (row,) = csv.DictReader(open(out / 'metrics.csv'))
    assert float(row['val_iwae_nats']) > float(row['val_elbo_nats'])          # the bound above the ELBO
    assert ckpt['selected_by'] == row['selected_by'] == 'val_iwae_nats'      # bernoulli: by its objective
    assert ckpt['val_selected'] == pytest.approx(float(row['val_iwae_nats']), abs=1e-3)
    assert ckpt['val_elbo_nats'] == pytest.approx(float(row['val_elbo_nats']), abs=1e-3)
    model, _ = vae.load_checkpoint(str(out / 'model.pt'))
    assert rundir.model_name(ckpt['args'], model.lik) == 'bernoulli-iwae3'
    elbo_flags = [f for f in flags if f not in ('--objective', 'iwae')]
    with pytest.raises(SystemExit, match='written with --objective iwae, this run has --objective elbo'):
        train.train(train.parse_args(elbo_flags + ['--epochs', '2', '--resume']))
    with pytest.raises(SystemExit):
        train.parse_args(flags + ['--kl-weight', '0.5'])      # the KL weight is an ELBO device
    assert train.parse_args(['--objective', 'iwae']).out_dir == os.path.join('runs', 'iwae5', 'bernoulli-z32-s0')


def test_a_run_from_before_the_objective_flags_resumes(tmp_path, synthetic_mnist):
    out = tmp_path / 'run'
    flags = ['--data-dir', synthetic_mnist, '--out-dir', str(out), '--subset', '128', '--batch-size', '64', '--latent-dim', '2']
    train.train(train.parse_args(flags + ['--epochs', '1']))
    state = torch.load(out / 'last.pt', weights_only=True)
    for k in rundir.NEWER_FLAGS:
        del state['args'][k]
    del state['best_elbo'], state['selected_by']
    torch.save(state, out / 'last.pt')
    train.train(train.parse_args(flags + ['--epochs', '2', '--resume']))
    ckpt = torch.load(out / 'model.pt', weights_only=True)
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert len(rows) == 2 and ckpt['val_elbo_nats'] == pytest.approx(max(float(r['val_elbo_nats']) for r in rows), abs=1e-3)


@pytest.mark.parametrize('bins', [256, 16, 2, 7])
def test_bits_per_dim_of_a_uniform_categorical(bins):
    """Uniform over K bins: 8 bits/dim exactly when K divides 256 (each 8-bit value gets
    1/256); for K = 7 each value of bin b gets 1/(7 |b|), computed here by counting."""
    lik = vae.make_likelihood('categorical', bins=bins)
    torch.nn.init.zeros_(lik.head.weight)
    torch.nn.init.zeros_(lik.head.bias)
    x8 = random_x8(4, 1, 28, 28)
    h = torch.randn(4, 28, 28, vae.VAE.features)
    bpd = -lik.log_prob_8bit(h, x8, lik.log_prob(h, vae.eval_data(lik, x8))) / (784 * math.log(2))
    size = [sum(1 for v in range(256) if v * bins // 256 == b) for b in range(bins)]
    want = torch.tensor([sum(math.log2(bins * size[v * bins // 256]) for v in img.flatten().tolist()) / 784
                         for img in x8])
    torch.testing.assert_close(bpd, want, rtol=1e-5, atol=1e-5)
    if 256 % bins == 0:
        torch.testing.assert_close(bpd, torch.full((4,), 8.0), rtol=1e-5, atol=1e-5)


def test_dequantised_bound_is_above_the_exact_discrete_nll():
    """Gaussian decoder on 8 small images: -E_u[log p((v + u)/256)] + 16 log 256 (E_u by the
    midpoint rule) >= -log P(v), P(v) the exact bin mass of lik.log_prob_8bit, which equals
    F((v + 1)/256) - F(v/256) from Normal's CDF (the end bins taking the tails)."""
    lik = vae.make_likelihood('gaussian', fit='gray')
    gen = torch.Generator().manual_seed(0)
    x8 = random_x8(8, 1, 4, 4)
    loc = x8[:, 0].double() / 255 + 0.03 * torch.randn(8, 4, 4, generator=gen, dtype=torch.float64)
    raw = torch.randn(8, 4, 4, generator=gen, dtype=torch.float64) - 3  # std about 0.02 to 0.15
    params = torch.stack([loc, raw], -1)
    d = lik.dist(params)                                           # 8 images of 4 x 4
    u = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    bound = -d.log_prob((x8.double() + u.view(-1, 1, 1, 1, 1)) / 256).mean(0) + 16 * math.log(256)
    with torch.no_grad():
        lik.head.weight.zero_()
        lik.head.weight[:, :2] = torch.eye(2)                     # features (loc, raw) -> params
        lik.head.bias.zero_()
    h = torch.cat([params, torch.zeros(8, 4, 4, vae.VAE.features - 2, dtype=torch.float64)], -1).float()
    exact = -lik.log_prob_8bit(h, x8, None).double()
    cdf = d.base_dist.cdf
    v = x8.double()
    mass = cdf(torch.where(v == 255, math.inf, (v + 1) / 256)) - cdf(torch.where(v == 0, -math.inf, v / 256))
    torch.testing.assert_close(exact, -mass.log().flatten(1).sum(1), rtol=1e-5, atol=1e-3)
    assert torch.isfinite(exact).all() and (bound > exact).all()


class ToyDiscretisedGaussian(vae.Likelihood):
    """An eighth likelihood defined in this file alone: a Normal discretised to the 256 levels
    (bins of width 1/255 around each level, the tails in the end levels)."""
    channels = 2
    data_name = '8-bit levels'
    clipped = True
    options = {'std_floor': vae.Option(float, 0.01, 'the least std', range=(1e-4, 1.0), tag='-floor{:g}')}

    def dist(self, params):
        return vae.images(Normal(vae.pixel(params[..., 0]), vae.positive(vae.pixel(params[..., 1]), self.std_floor),
                                 validate_args=False))

    def log_prob(self, h, x):
        d = self(h).base_dist
        v = torch.round(x.double() * 255)
        lo = torch.where(v == 0, -math.inf, (v - 0.5) / 255)
        hi = torch.where(v == 255, math.inf, (v + 0.5) / 255)
        return D.normal_log_interval(d.loc.double(), d.scale.double(), lo, hi).flatten(-3).sum(-1).float()

    def sample(self, h):
        return torch.round(self(h).sample().clamp(0, 1) * 255) / 255


def test_the_compare_estimate_adds_training_and_evaluation_from_the_first_epoch():
    """8 runs of 20 epochs at 30 s; validation took 12 s for 10,000 images, so one draw costs
    1.2 ms, and each run's evaluation (k = 100 on 10,000, the k-curve 1000 on 1,000) 2,000,000
    draws: 2,400 s. In all 8 (600 + 2,400) s = 6 h 40 min."""
    args = train.parse_args(['--dist', 'bernoulli', '--epochs', '20', '--compare-plan', '8', '100', '10000', '1000'])
    said = train.compare_estimate(args, {'seconds': 30.0, 'eval_seconds': 12.0}, 10000)
    assert 'about 6 h 40 min' in said and '8 runs of at most 20 epochs at 30 s' in said and 'bernoulli run' in said
    assert '1 h 20 min' in said and '5 h 20 min' in said                       # training, evaluation
    assert '--compare-plan' not in rundir.command(args, train.make_parser())    # not a flag a resume needs
    iw = train.parse_args(['--objective', 'iwae', '--iw-samples', '5', '--epochs', '20', '--compare-plan', '8', '100',
                           '10000', '1000'])    # its validation drew 1 + 5 samples per image: 12 s is 0.2 ms a draw
    assert '5 h 20 min' in train.compare_estimate(iw, {'seconds': 30.0, 'eval_seconds': 72.0}, 10000)


def test_a_new_likelihood_needs_one_class_and_one_registry_line(monkeypatch, synthetic_mnist, tmp_path, capsys):
    """Registered here, the toy and its option (--std-floor) train through train.py, resume, and
    are scored and ranked by compare_likelihoods.py on the 8-bit pixels, with no script knowing
    its name or its option."""
    monkeypatch.setitem(vae.LIKELIHOODS, 'toy', ToyDiscretisedGaussian)
    run = tmp_path / 'toy-z2-s0'
    flags = ['--dist', 'toy', '--data-dir', synthetic_mnist, '--out-dir', str(run), '--subset', '256', '--latent-dim', '2',
             '--std-floor', '0.02']
    assert '--std-floor' in train.make_parser().format_help()
    train.train(train.parse_args(flags + ['--epochs', '1']))
    assert (run / 'model.pt').exists() and (run / 'samples.png').exists()
    with pytest.raises(SystemExit, match='was written with --std-floor 0.02, this run has --std-floor 0.01'):
        train.train(train.parse_args(flags[:-2] + ['--epochs', '2', '--resume']))
    train.train(train.parse_args(flags + ['--epochs', '2', '--resume']))
    model, ckpt = vae.load_checkpoint(run / 'model.pt')
    assert ckpt['args']['std_floor'] == 0.02 and model.lik.std_floor == 0.02 and ckpt['epoch'] >= 1
    assert len(list(csv.DictReader(open(run / 'metrics.csv')))) == 2
    cmp.main([str(run), '--data-dir', synthetic_mnist, '--out', str(tmp_path / 'res'), '--k', '3', '--n-test', '32',
              '--n-curve', '2', '--classifier', untrained_judge(tmp_path / 'judge.pt'), '--n-samples', '40'])
    row = next(csv.DictReader(open(tmp_path / 'res' / 'likelihoods.csv')))
    assert all(math.isfinite(float(row[c])) for c in quality.QUALITY_COLUMNS) and row['quality_n'] == '40'
    assert (tmp_path / 'res' / 'quality.png').exists()
    assert row['dist'] == 'toy-floor0.02' and row['test_data'] == '8-bit levels' and row['scored_on'] == '8-bit pixels (exact)'
    assert 0 < float(row['bits_per_dim']) < 20 and row['bound_bits_per_dim'] == ''
    assert float(row['nll_8bit_nats']) == -float(row['iwae_nats'])
    assert 'toy' in capsys.readouterr().out


def half_kl_objective(model, x, args, dtype=None):
    """A third objective defined in this file alone: the negative ELBO with its KL halved."""
    log_px, kl, h = vae.elbo_terms(model, x, args.samples, dtype=dtype)
    return -(log_px - kl / 2), log_px - kl


def test_a_new_objective_needs_one_function_and_one_registry_line(monkeypatch, synthetic_mnist, tmp_path):
    """Registered here, the toy objective trains through train.py, resumes, and is compared
    under its own name, with no script knowing it."""
    monkeypatch.setitem(vae.OBJECTIVES, 'halfkl', half_kl_objective)
    flags = ['--dist', 'gaussian', '--data-dir', synthetic_mnist, '--subset', '256', '--latent-dim', '2',
             '--objective', 'halfkl']
    args = train.parse_args(flags + ['--epochs', '1'])
    run = tmp_path / 'run'
    assert args.out_dir == os.path.join('runs', 'halfkl', 'gaussian-z2-s0')     # its runs apart from the ELBO's
    train.train(train.parse_args(flags + ['--epochs', '1', '--out-dir', str(run)]))
    with pytest.raises(SystemExit, match='was written with --objective halfkl, this run has --objective elbo'):
        train.train(train.parse_args(flags[:-2] + ['--epochs', '2', '--out-dir', str(run), '--resume']))
    train.train(train.parse_args(flags + ['--epochs', '2', '--out-dir', str(run), '--resume']))
    rows = list(csv.DictReader(open(run / 'metrics.csv')))
    assert len(rows) == 2 and float(rows[0]['train_loss']) < -float(rows[0]['train_elbo_nats'])   # the halved KL
    cmp.main([str(run), '--data-dir', synthetic_mnist, '--out', str(tmp_path / 'res'), '--k', '3', '--n-test', '32',
              '--n-curve', '2', '--n-samples', '0'])
    row = next(csv.DictReader(open(tmp_path / 'res' / 'likelihoods.csv')))
    assert row['dist'] == 'gaussian-halfkl' and 0 < float(row['bits_per_dim']) < 20
    assert row['fd_decoder_mean'] == '' and not (tmp_path / 'res' / 'quality.png').exists()   # --n-samples 0: none


def test_a_likelihoods_own_columns_are_reported_with_what_they_are():
    row = {'dist': 'cbernoulli', 'seed': 1, 'cb_gray_elbo_nats': -10.0, 'cb_gray_bce_elbo_nats': -12.5,
           'cb_gray_normaliser_nats': 2.5}
    line = cmp.diagnostic_note(row, vae.LIKELIHOODS['cbernoulli'].diagnostic_columns)
    assert line.startswith('cbernoulli (seed 1): ELBO on gray values with the normalised density -10.00 nats; ')
    assert '(unnormalised, not a log-probability) -12.50 nats; ' in line and line.endswith('difference 2.50 nats')
    assert cmp.diagnostic_note(row, vae.LIKELIHOODS['gaussian'].diagnostic_columns) == ''
    assert cmp.columns()[-len(cmp.TAIL) - 3:-len(cmp.TAIL)] == ['cb_gray_elbo_nats', 'cb_gray_bce_elbo_nats',
                                                                'cb_gray_normaliser_nats']


def test_mean_ci_over_seeds():
    assert cmp.mean_ci([2.0]) == (2.0, None, None)
    m, lo, hi = cmp.mean_ci([1.0, 2.0, 3.0])     # sd 1; t(0.975, 2 d.o.f.) = 4.3027 (printed tables)
    assert m == 2.0 and math.isclose(hi - m, 4.3027 / math.sqrt(3), rel_tol=1e-4) and math.isclose(m - lo, hi - m)
    m, lo, hi = cmp.mean_ci([0.0, 2.0] * 20)     # 39 d.o.f.: t = 2.0227, between the table's rows
    assert math.isclose(hi - m, 2.0227 * math.sqrt(40 / 39) / math.sqrt(40), rel_tol=1e-4)

# -----------------------------------------------------------------------------
# plot_latent.py


def test_knn_accuracy_on_separated_clusters_and_on_shuffled_labels():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(100)                           # 1,000 points, 10 digits
    angle = labels.float() * 2 * math.pi / 10
    centres = 50 * torch.stack([angle.cos(), angle.sin()], 1)                  # 31 apart, spread 1
    points = centres + torch.randn(1000, 2, generator=gen)
    assert plot_latent.knn_accuracy(points, labels) == 1.0
    shuffled = labels[torch.randperm(1000, generator=gen)]
    assert abs(plot_latent.knn_accuracy(points, shuffled) - 0.1) < 0.04        # chance: 1 in 10
    # a 1-1 tie (k = 2) goes to the nearer neighbour: point 0 has 1 (label 1) and -2 (label 2)
    line = torch.tensor([[0.0], [1.0], [-2.0], [1.1], [-2.1]])
    assert plot_latent.knn_accuracy(line, torch.tensor([1, 1, 2, 1, 2]), k=2) == 1.0
    assert plot_latent.knn_accuracy(line, torch.tensor([2, 1, 2, 1, 2]), k=2) == 0.8


def test_manifold_grid_sits_at_prior_quantiles():
    from statistics import NormalDist
    n = 20
    q = plot_latent.prior_quantiles(n)
    want = torch.tensor([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
    torch.testing.assert_close(q, want, rtol=0, atol=1e-5)
    assert abs(q[0] + 1.959964) < 1e-5 and torch.allclose(q, -q.flip(0), atol=1e-6)
    z = plot_latent.manifold_latents(n, torch.eye(2)).view(n, n, 2)            # (row, column, z)
    for i in range(n):
        for j in range(n):          # z1 grows to the right, z2 upwards (row 0 is the top)
            assert z[i, j, 0] == q[j] and z[i, j, 1] == q[n - 1 - i]
    # in more dimensions: the same quantiles along the two basis directions, 0 elsewhere
    basis = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0)))[0]
    z6 = plot_latent.manifold_latents(n, basis)
    torch.testing.assert_close(z6 @ basis, z.view(-1, 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(z6 - z6 @ basis @ basis.T, torch.zeros(n * n, 6), rtol=0, atol=1e-5)


def test_pca_plane_finds_the_main_directions():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 1, generator=gen), torch.randn(500, 1, generator=gen)
    a, b = a - a.mean(), b - b.mean()
    b = b - (a * b).sum() / (a * a).sum() * a                                 # uncorrelated with a
    e = torch.eye(5)
    mu = 10 * a * -e[1] + 3 * b * e[3] + 0.01 * torch.randn(500, 5, generator=gen) + 7
    basis, note = plot_latent.plane(mu)
    torch.testing.assert_close(basis, torch.stack([e[1], e[3]], 1), rtol=0, atol=1e-3)  # signs: largest loading > 0
    assert 'latent dim 5' in note and 'principal components' in note and '(100% of its variance)' in note
    assert plot_latent.plane(mu[:, :2])[1] is None and torch.equal(plot_latent.plane(mu[:, :2])[0], torch.eye(2))


def bad_checkpoint(tmp_path, kind):
    path = tmp_path / 'model.pt'
    if kind == 'foreign':
        torch.save({'state_dict': {'w': torch.zeros(2)}}, path)
    elif kind == 'pickle':
        torch.save({'format': vae.CKPT_FORMAT, 'args': argparse.Namespace(dist='bernoulli')}, path)
    elif kind == 'truncated':
        torch.save({'w': torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    elif kind == 'text':
        path.write_text('not a checkpoint\n')
    return path


@pytest.mark.parametrize('kind,says', [('missing', 'no such checkpoint'), ('foreign', 'not a checkpoint written by'),
                                       ('pickle', 'weights_only=True'), ('truncated', 'not a readable PyTorch file'),
                                       ('text', 'not a readable PyTorch file')])
def test_plot_latent_bad_checkpoint_is_one_line(tmp_path, kind, says):
    path = bad_checkpoint(tmp_path, kind)
    with pytest.raises(SystemExit) as e:
        plot_latent.main(['--ckpt', str(path), '--out', str(tmp_path / 'out')])
    msg = str(e.value.code)
    assert msg.startswith('error: ') and says in msg and '\n' not in msg, msg
    assert not (tmp_path / 'out').exists()

# -----------------------------------------------------------------------------
# reliability: one owner per run directory, no stale model, one-line errors everywhere


def test_concurrent_atomic_writes_to_one_path_never_collide(tmp_path):
    """Temporary files have unique names: eight threads writing one path all succeed, and the
    file is one of the complete versions, with no temporary file left."""
    from concurrent.futures import ThreadPoolExecutor
    path = str(tmp_path / 'metrics.csv')
    rows = [[{'a': i, 'b': 'x' * 10000}] for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda r: utils.write_csv(r * 50, path, ['a', 'b']), rows))
    got = list(csv.DictReader(open(path)))
    assert len(got) == 50 and len({r['a'] for r in got}) == 1 and os.listdir(tmp_path) == ['metrics.csv']


def test_an_interrupt_inside_torch_save_stays_an_interrupt(tmp_path):
    """Ctrl-C in the middle of a record makes torch.save's clean-up raise a RuntimeError; the
    atomic save still raises KeyboardInterrupt (train.fit's resume hint, exit 130, not a
    traceback) and leaves neither the file nor a temporary one."""
    real_write, calls = io.BufferedWriter.write, []

    class Interrupting(io.BufferedWriter):
        def write(self, b):
            calls.append(len(b))
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real_write(self, b)

    def save(f):
        torch.save({'a': torch.zeros(1000), 'b': torch.ones(1000)}, Interrupting(f.raw))
    with pytest.raises(BaseException) as plain, open(tmp_path / 'plain', 'wb') as f:   # torch.save alone
        save(f)
    assert utils.was_interrupted(plain.value) and len(calls) == 3
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        utils.write_atomic(str(tmp_path / 'model.pt'), save)
    assert sorted(os.listdir(tmp_path)) == ['plain']


def test_only_an_interrupt_in_the_chain_counts_as_one():
    """The walk back through causes and contexts finds an interrupt, stops at an exception the
    caller is already handling (a full disk while saving on Ctrl-C is a full disk), and ends on
    a cycle of cause and context."""
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as handled:
            before = handled
            raise OSError(28, 'No space left on device')
    except OSError as e:
        assert utils.was_interrupted(e) and not utils.was_interrupted(e, before)
    a, b = ValueError('a'), RuntimeError('b')
    a.__context__, b.__cause__ = b, a
    assert not utils.was_interrupted(a) and not utils.was_interrupted(RuntimeError('unrelated'))


def test_resume_on_another_kind_of_device_says_so_and_finishes(tmp_path, synthetic_mnist, capsys):
    """A last.pt whose shuffling generator was a CUDA one (its state cannot enter a CPU
    generator) resumes on the CPU with a one-line note instead of crashing."""
    out = tmp_path / 'run'
    flags = ['--data-dir', synthetic_mnist, '--out-dir', str(out), '--subset', '256', '--latent-dim', '2']
    train.train(train.parse_args(flags + ['--epochs', '1']))
    state = torch.load(out / 'last.pt', weights_only=True)
    state['rng']['device'], state['rng']['generator'] = 'cuda', torch.zeros(16, dtype=torch.uint8)  # a CUDA state
    torch.save(state, out / 'last.pt')
    capsys.readouterr()
    train.train(train.parse_args(flags + ['--epochs', '2', '--resume']))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith('note: last.pt was saved on cuda')]
    assert len(notes) == 1 and 'differ from an uninterrupted run' in notes[0] and len(metric_values(out)) == 2


def test_an_error_while_stopping_exits_as_an_interrupt_and_names_it(monkeypatch, capsys):
    """The exception hook: a RuntimeError raised while an interrupt was handled is one line, with
    the error named, and exit status 130; the same error alone keeps its traceback."""
    import signal
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    exits, tracebacks = [], []
    monkeypatch.setattr(os, '_exit', exits.append)
    monkeypatch.setattr(sys, '__excepthook__', lambda *a: tracebacks.append(a[0]))
    try:
        try:
            try:
                raise KeyboardInterrupt
            finally:
                raise RuntimeError('unexpected pos 20389952 vs 20389840')
        except RuntimeError as e:
            utils._excepthook(RuntimeError, e, e.__traceback__)
        utils._excepthook(RuntimeError, RuntimeError('a bug'), None)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    err = capsys.readouterr().err
    assert exits == [130] and tracebacks == [RuntimeError]
    assert err == 'interrupted (then, while stopping: unexpected pos 20389952 vs 20389840)\n', err


def test_after_the_first_interrupt_the_next_one_exits_at_once(monkeypatch):
    """A second Ctrl-C or SIGTERM cannot land in the clean-up or the exit of the first: from the
    moment the first is raised, the next one exits with 130 and one line (a second
    KeyboardInterrupt inside the exception hook once made Python die of SIGINT, exit status -2).
    A signal inherited as ignored stays ignored."""
    import signal
    import time
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, 'excepthook', sys.excepthook)
    exits = []
    monkeypatch.setattr(os, '_exit', exits.append)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)   # as Python starts in a terminal, not behind `cmd &`
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        utils.one_line_errors()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        signal.signal(signal.SIGTERM, saved[signal.SIGTERM])
        utils.one_line_errors()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        for s in (signal.SIGINT, signal.SIGTERM):
            os.kill(os.getpid(), s)          # no KeyboardInterrupt now: the exit, once each
            time.sleep(0.05)
        assert exits == [130, 130]
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)

# -----------------------------------------------------------------------------
# sample quality (quality.py): the Fréchet distance, the inception score, the classifier's run


def gaussian_pair(d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
    return (torch.randn(d, generator=g, dtype=torch.float64), a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64),
            torch.randn(d, generator=g, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(d, dtype=torch.float64))


def test_frechet_distance_of_gaussians_matches_scipy_sqrtm():
    """torchmetrics' formula against |m1 - m2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) (scipy), exactly
    from the parameters, and from 200,000 draws of each Gaussian within 2 %."""
    from scipy.linalg import sqrtm
    from torchmetrics.image.fid import _compute_fid
    m1, s1, m2, s2 = gaussian_pair()
    want = ((m1 - m2) ** 2).sum().item() + (s1 + s2).trace().item() - 2 * sqrtm((s1 @ s2).numpy()).real.trace()
    assert _compute_fid(m1, s1, m2, s2).item() == pytest.approx(want, rel=1e-9)
    g = torch.Generator().manual_seed(1)
    draw = lambda m, s: m + torch.randn(200000, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s).T  # noqa: E731
    assert quality.frechet_distance(draw(m1, s1), draw(m2, s2)) == pytest.approx(want, rel=0.02)


def test_frechet_distance_of_a_set_to_itself_is_zero_and_to_a_shift_is_its_square():
    f = torch.randn(5000, 128, generator=torch.Generator().manual_seed(0))
    assert abs(quality.frechet_distance(f, f)) < 1e-6
    assert quality.frechet_distance(f, f + 0.5) == pytest.approx(128 * 0.25, rel=1e-6)


def test_frechet_stderr_is_the_spread_of_new_sample_sets():
    """The bootstrap standard error matches the spread of the distance over independent sets of
    samples from the same Gaussian (within a factor 2), and halves with four times the samples."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    new = lambda n: torch.randn(n, 8, generator=g, dtype=torch.float64) * 1.1 + 0.2    # noqa: E731
    spread = torch.tensor([quality.frechet_distance(real, new(1000)) for _ in range(20)]).std().item()
    small, big = quality.frechet_stderr(real, new(1000), draws=20), quality.frechet_stderr(real, new(4000), draws=20)
    assert spread / 2 < small < spread * 2
    assert 0.3 < big / small < 0.7


def test_inception_score_and_label_entropy_at_their_extremes():
    one_class = torch.zeros(100, 10)
    one_class[:, 3] = 1
    assert quality.inception_score(one_class) == pytest.approx((1.0, 0.0), abs=1e-6)
    every_class = torch.eye(10).repeat(10, 1)        # confident and uniform over the ten digits
    assert quality.inception_score(every_class) == pytest.approx((10.0, math.log(10)), rel=1e-6)
    unsure = torch.full((100, 10), 0.1)              # uniform labels, no confidence: score 1
    assert quality.inception_score(unsure) == pytest.approx((1.0, math.log(10)), rel=1e-6)


@pytest.mark.parametrize('dist', ['bernoulli', 'gaussian', 'categorical'])
def test_sample_quality_columns_of_a_tiny_model(dist):
    torch.manual_seed(0)
    model, clf = vae.VAE(lik_of(dist), latent_dim=4).eval(), quality.Classifier().eval()
    x8, labels = random_x8(50, 1, 28, 28), torch.arange(50) % 10
    got = quality.sample_quality(model, clf, x8, labels, n=60, batch=25)
    assert set(got) == set(quality.QUALITY_COLUMNS)
    assert all(math.isfinite(v) for v in got.values()) and 0 <= got['recon_accuracy'] <= 1
    assert got['fd_decoder_mean'] != got['fd_px_sample']
    assert quality.sample_quality(model, clf, x8, labels, n=60, batch=25) == got     # fixed noise: repeatable


def test_the_classifier_trains_resumes_and_refuses_other_flags(synthetic_mnist, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / 'clf')
    flags = ['--data-dir', synthetic_mnist, '--out-dir', out, '--batch-size', '64']
    whole = quality.main(flags + ['--epochs', '2'])
    last = torch.load(os.path.join(out, 'last.pt'), weights_only=True)
    assert last['state']['epoch'] == 2 and whole['epoch'] in (1, 2)
    assert set(os.listdir(out)) >= {'model.pt', 'last.pt'}
    with pytest.raises(SystemExit, match='other --epochs'):
        quality.main(flags + ['--epochs', '3'])
    clf, ckpt = quality.load_classifier(os.path.join(out, 'model.pt'))
    assert ckpt['test_accuracy'] == whole['test_accuracy'] and not clf.training
    # interrupted after epoch 1's last.pt, then resumed: the same weights as the whole run
    other, save = str(tmp_path / 'clf2'), utils.save_torch

    def save_then_stop(obj, path):
        save(obj, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(utils, 'save_torch', save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        quality.main(['--data-dir', synthetic_mnist, '--out-dir', other, '--batch-size', '64', '--epochs', '2'])
    monkeypatch.setattr(utils, 'save_torch', save)
    resumed = quality.main(['--data-dir', synthetic_mnist, '--out-dir', other, '--batch-size', '64', '--epochs', '2'])
    assert 'resuming' in capsys.readouterr().out
    assert all(torch.equal(resumed['state_dict'][k], whole['state_dict'][k]) for k in whole['state_dict'])


# -----------------------------------------------------------------------------
# compress.py: bits-back coding with ANS


@pytest.mark.parametrize('dist', ALL)
def test_coding_tables_are_normalised_and_give_the_8bit_score(dist):
    """Each pixel's table over its symbols sums to 1, and the symbols' entries of an image sum to
    its score: log_prob_8bit (bernoulli: log_prob of its binarisation), float64 against float32."""
    model = vae.build({'dist': dist, 'latent_dim': 4, 'bins': 7 if dist == 'categorical' else 256}).eval()
    lik = model.lik
    with torch.inference_mode():
        x8 = lik.coded(random_x8(3, 1, 28, 28))
        x = vae.eval_data(lik, x8)
        h = model(x)[0]                                                      # (1, 3, 28, 28, F)
        table = lik.log_prob_symbols(h)                                      # (1, 3, 1, 28, 28, S)
        assert table.dtype == torch.float64 and table.shape[-1] == lik.symbols
        torch.testing.assert_close(table.logsumexp(-1), torch.zeros(table.shape[:-1], dtype=torch.float64),
                                   rtol=0, atol=1e-6)
        s = (x8.long() * (lik.symbols - 1) // 255).unsqueeze(-1).expand(table.shape[:-1] + (1,))
        got = table.gather(-1, s).flatten(-4).sum(-1)                        # (1, 3)
        want = lik.log_prob_8bit(h, x8, lik.log_prob(h, x))
        want = lik.log_prob(h, x) if want is None else want
        torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=0)


def coded_file(tmp_path, dist, n=20, **opts):
    """A tiny untrained model saved as a run, its first n synthetic images coded into a file."""
    args = {'dist': dist, 'latent_dim': 4, **opts}
    torch.manual_seed(0)
    model = vae.build(args).eval()
    ckpt = tmp_path / 'model.pt'
    torch.save({'format': vae.CKPT_FORMAT, 'args': args, 'state_dict': model.state_dict()}, ckpt)
    x8 = model.lik.coded(synthetic_images(n, seed=1))
    words = compress.encode(model, x8, latent_bits=8)
    path = tmp_path / 'x.bbans'
    compress.write_file(path, compress.header_of(ckpt, n, 8, x8), words)
    return model, ckpt, path, x8, words


@pytest.mark.parametrize('dist,opts', [(d, {}) for d in ALL] + [('categorical', {'bins': 7})])
def test_bits_back_round_trip_is_lossless_at_its_information_content(tmp_path, dist, opts):
    """Images through the file and back, bit for bit; encoding again gives the same words; and the
    words beyond the start words cost what the coded symbols' information says: the pixels'
    -log2 P(x|z) from the likelihood's own tables (in torch, not the coder's arrays), plus the
    latent buckets' bits, minus the bits got back, -log2 q, within 64 bits and 0.1 %. (This catches
    a pixel coded with another pixel's table: the coder reads its arrays' memory in C order.)"""
    model, ckpt, path, x8, words = coded_file(tmp_path, dist, n=5, **opts)
    got = compress.decompress(model, ckpt, path)
    assert got.dtype == torch.uint8 and torch.equal(got, x8)
    assert np.array_equal(compress.encode(model, x8, latent_bits=8), words)
    bb, coder, bits = compress.BitsBack(model, 8), constriction.stream.stack.AnsCoder(compress.start_words()), 0.0
    with torch.inference_mode():
        for i in range(x8.shape[0]):                  # the z the coder draws: it pops them from the same stack
            q = bb.posterior(x8[i:i + 1])
            z = coder.decode(bb.table, q)
            h = model.decode(bb.centres[torch.from_numpy(z).long()].view(1, -1))
            s = x8[i:i + 1].long() * (model.lik.symbols - 1) // 255
            log_px = model.lik.log_prob_symbols(h).gather(-1, s.unsqueeze(-1))     # (1, 1, 28, 28, 1)
            # the coder floors each symbol's probability at 2^-24 (its precision): at most 24 bits a pixel
            bits += (-log_px / math.log(2)).clamp(max=24).sum().item() + 8 * len(z) + np.log2(q[np.arange(len(z)), z]).sum()
            coder.encode_reverse(bb.symbols(x8[i:i + 1]), bb.table, bb.pixels(z))
            coder.encode_reverse(z, bb.prior)
    assert abs(32 * (len(words) - compress.INIT_WORDS) - bits) < 64 + 1e-3 * bits


def test_the_coder_gets_each_pixels_own_table():
    """C-ordered (784, S) tables, row j the table of pixel j: constriction reads the raw buffer."""
    model = vae.build({'dist': 'gaussian', 'latent_dim': 4}).eval()
    bb = compress.BitsBack(model, latent_bits=8)
    z = np.array([3, 100, 200, 255], dtype=np.int32)
    with torch.inference_mode():
        p = bb.pixels(z)
        h = model.decode(bb.centres[torch.from_numpy(z).long()].view(1, -1))
        want = model.lik.log_prob_symbols(h)[0, 0, 5, 17].exp().numpy()     # pixel (5, 17): row 5 * 28 + 17
    assert p.shape == (784, 256) and p.flags['C_CONTIGUOUS']
    np.testing.assert_allclose(p[5 * 28 + 17] / p[5 * 28 + 17].sum(), want, rtol=1e-9, atol=1e-15)


def test_a_damaged_file_or_another_model_is_refused(tmp_path):
    """Never a wrong image: a flipped byte in the data or the header, a truncated file, coded data
    under a valid checksum that decodes wrong, another checkpoint or thread count: FormatError."""
    model, ckpt, path, x8, words = coded_file(tmp_path, 'categorical')
    data = bytearray(path.read_bytes())
    header_at = len(compress.MAGIC) + 32 + 10
    for damaged, says in [(data[:-1] + bytes([data[-1] ^ 1]), 'damaged'), (data[:len(data) // 2], 'damaged'),
                          (data[:header_at] + bytes([data[header_at] ^ 4]) + data[header_at + 1:], 'damaged'),
                          (b'PNG' + data[3:], 'not a file written by compress.py')]:
        path.write_bytes(bytes(damaged))
        with pytest.raises(compress.FormatError, match=says):
            compress.decompress(model, ckpt, path)
    bad = words.copy()
    bad[len(bad) // 2] ^= 0x00010000
    compress.write_file(path, compress.header_of(ckpt, 20, 8, x8), bad)     # a valid checksum over wrong data
    with pytest.raises(compress.FormatError):
        compress.decompress(model, ckpt, path)
    compress.write_file(path, {**compress.header_of(ckpt, 20, 8, x8), 'threads': 99}, words)
    with pytest.raises(compress.FormatError, match="'threads': 99"):
        compress.decompress(model, ckpt, path)
    compress.write_file(path, compress.header_of(ckpt, 20, 8, x8), words)
    torch.save({'format': vae.CKPT_FORMAT, 'args': {'dist': 'categorical', 'latent_dim': 4},
                'state_dict': vae.build({'dist': 'categorical', 'latent_dim': 4}).state_dict()}, tmp_path / 'other.pt')
    with pytest.raises(compress.FormatError, match='another checkpoint'):
        compress.decompress(model, tmp_path / 'other.pt', path)
    assert torch.equal(compress.decompress(model, ckpt, path), x8)


def test_latent_buckets_have_equal_prior_mass_and_q_is_a_distribution():
    model = vae.build({'dist': 'categorical', 'latent_dim': 4}).eval()
    bb = compress.BitsBack(model, latent_bits=6)
    mass = torch.special.ndtr(bb.edges).diff()                               # (64,)
    torch.testing.assert_close(mass, torch.full((64,), 1 / 64, dtype=torch.float64))
    with torch.inference_mode():
        q = bb.posterior(random_x8(1, 1, 28, 28))                            # (4, 64)
    assert q.shape == (4, 64) and (q >= 0).all()
    np.testing.assert_allclose(q.sum(1), 1, rtol=1e-12)


def test_compress_cli_writes_its_row_with_the_baselines(tmp_path, synthetic_mnist):
    run = tmp_path / 'run'
    run.mkdir()
    torch.save({'format': vae.CKPT_FORMAT, 'args': {'dist': 'logistic', 'latent_dim': 4, 'seed': 0},
                'state_dict': vae.build({'dist': 'logistic', 'latent_dim': 4}).state_dict()}, run / 'model.pt')
    row = compress.main([str(run), '--n', '5', '--data-dir', synthetic_mnist, '--out', str(tmp_path / 'f.bbans'),
                         '--latent-bits', '8', '--csv', str(tmp_path / 'c.csv')])
    assert row['n'] == 5 and row['file_bytes'] == os.path.getsize(tmp_path / 'f.bbans')
    assert row['file_bits_per_dim'] == 8 * row['file_bytes'] / (5 * 784)
    raw = 8 * 5 * 784
    assert all(0 < row[f'{k}_bits_per_dim'] * 5 * 784 < 2 * raw for k in ('gzip', 'bz2', 'lzma', 'png'))
    rows = list(csv.DictReader(open(tmp_path / 'c.csv')))
    assert [r['dist'] for r in rows] == ['logistic'] and float(rows[0]['gap_percent']) == pytest.approx(
        row['gap_percent'], rel=1e-5)


# -----------------------------------------------------------------------------
# bench.py


@pytest.mark.parametrize('bf16', ['in hardware', 'emulated', 'emulated, forced'])
def test_bench_measures_bf16_only_where_the_hardware_has_it_and_any_peak_agrees(bf16, synthetic_mnist, tmp_path,
                                                                               monkeypatch, capsys):
    """What the machine reports is patched: bf16 in hardware or not, and a GEMM peak of 0.2 GFLOP/s
    (as emulated bf16 measures); the rows follow the rule train.py --precision auto uses, and every
    derived column agrees with its parts whatever the figures."""
    import bench
    monkeypatch.setattr(bench, 'in_fresh_process', bench.measure)          # in this process, so the patches hold
    monkeypatch.setattr(bench, 'gemm_peak', lambda device, dtype: 0.2)
    monkeypatch.setattr(utils, 'native_bf16', lambda device: bf16 == 'in hardware')
    forced = ['--precisions', 'bf16'] if bf16.endswith('forced') else []
    bench.main(BENCH_TINY + ['--data-dir', synthetic_mnist, '--subset', '128', '--batch-size', '64', '--epochs', '1',
                             '--loops', 'train.py', *forced, '--out', str(tmp_path / 'b.csv')])
    rows = bench_rows(tmp_path / 'b.csv', 128)
    want = {'in hardware': ['fp32', 'bf16'], 'emulated': ['fp32'], 'emulated, forced': ['bf16']}[bf16]
    assert [r['precision'] for r in rows] == want and all(float(r['peak_gflop_s']) == 0.2 for r in rows)
    said = [line for line in capsys.readouterr().out.splitlines() if 'bf16 skipped' in line]
    assert len(said) == (bf16 == 'emulated') and (not said or '--precisions bf16' in said[0])
    for r in rows:       # one epoch between two ceiling runs: its paired ceiling is their mean, the median of both
        assert float(r['ratio']) == pytest.approx(float(r['epoch_img_s']) / float(r['ceiling_img_s']), rel=1e-4)
