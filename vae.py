"""Convolutional VAE on MNIST with a choice of observation likelihood p(x|z).

Images are float tensors (B, 1, 28, 28) in [0, 1], each likelihood's data: the encoder's input and
log_prob's argument. The decoder gives per-pixel features, each likelihood's head the parameters.
Losses are per example (summed over pixels and latent dims), averaged over the batch for the
optimiser; reported numbers are nats per image.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Bernoulli, Beta, Categorical, Independent, MixtureSameFamily, Normal

import utils
from distributions import (CategoricalHeadNLL, ContinuousBernoulli, ConvTranspose2d, DiscretizedLogistic,
                           beta_log_interval, normal_log_interval)

N_PIXELS = 784
LOG256 = math.log(256)
BITS = N_PIXELS * math.log(2)   # nats per image -> bits per pixel
EVAL_SEED = 1234  # fixed noise for validation/test binarisation and dequantisation
CKPT_FORMAT = 'conv-vae-likelihoods/1'

# -----------------------------------------------------------------------------
# likelihoods p(x|z): one registry, each entry turns decoder output into a distribution


def positive(raw, floor):
    """Unconstrained -> (floor, inf): scales and concentrations never reach 0."""
    return F.softplus(raw) + floor


def bin_edges(x8):
    """8-bit values v (uint8) -> their bins [v/256, (v+1)/256) (float64), which hold (v + u)/256 and v/255."""
    v = x8.double()
    return v / 256, (v + 1) / 256


def images(base):
    """The last three dims (1, H, W) as one event; no argument validation (a third of a categorical step)."""
    return Independent(base, 3, validate_args=False)


def pixel(p):
    """One parameter channel (..., H, W) -> (..., 1, H, W), the layout of the images."""
    return p.unsqueeze(-3)


class Option(NamedTuple):
    """A likelihood's option, declared on its class: train.py's flag --<name>, and the run-name
    suffix tag.format(value) where it is not at its default."""
    type: type
    default: object
    help: str
    range: tuple = None       # (low, high), both allowed
    choices: tuple = None
    tag: str = '-{}'


class Likelihood(nn.Module):
    """p(x|z) for one --dist: a per-pixel linear head (features -> `channels` unconstrained
    parameters) and `dist` (constraints -> a distribution over whole images). All the scripts
    know of a likelihood is here, so a new one is a subclass and a registry line:
    data(x8) the images it models; log_prob_8bit its exact score of 8-bit images (None: none);
    density: scored by integrating over each 8-bit bin; scored: validation picks its checkpoint
    by that score; options {name: Option} (attributes of those names); clipped: its means and
    samples may leave [0, 1]; diagnostics() the `diagnostic_columns` of likelihoods.csv; coded,
    symbols and log_prob_symbols what compress.py codes and with which tables."""
    channels = 1
    default_kl_weight = 1.0
    data_name = 'gray values'
    density = False
    scored = True         # has an exact 8-bit score, which then picks its checkpoint
    clipped = False
    loss_form = None      # the name of its own training loss (Likelihood.loss) where it has one
    symbols = 256         # compress.py codes each pixel as one of these
    options = {}
    before_options = {}   # what a checkpoint from before an option existed was trained with
    diagnostic_columns = {}   # column of likelihoods.csv -> what it is (diagnostics() computes them)

    def __init__(self, features, **options):
        super().__init__()
        for name, opt in self.options.items():          # as given, else its default
            value = opt.default if options.get(name) is None else options[name]
            if opt.choices and value not in opt.choices:
                raise ValueError(f"{type(self).__name__} has no {name} {value!r}: it offers {', '.join(opt.choices)}")
            setattr(self, name, value)
        self.head = nn.Linear(features, self.channels)

    def tag(self):
        """Suffix of the run name: each option not at its default, by its tag."""
        return ''.join(o.tag.format(getattr(self, n)) for n, o in self.options.items() if getattr(self, n) != o.default)

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
        """Exact log P(x8 | z) of 8-bit images x8 (B, 1, H, W) (..., B), given log_px = self.log_prob(h, x)
        of its data x of x8; here its data are the 256 levels, so that is it."""
        return log_px

    def mean(self, h):
        return self(h).mean

    def sample(self, h):
        return self(h).sample()

    def coded(self, x8):
        """The 8-bit images compress.py codes of x8, a pixel as symbol x8 * (symbols - 1) / 255: x8 itself."""
        return x8

    def log_prob_symbols(self, h):
        """log P(s | z) of each symbol at each pixel (..., 1, H, W, symbols), float64: compress.py's
        tables. Here dist's, a distribution over the 256 levels v/255."""
        v = torch.arange(256, device=h.device, dtype=torch.float64).view((256,) + (1,) * h.dim()) / 255
        return self.dist(self.params(h).double()).base_dist.log_prob(v).movedim(0, -1)

    def loss(self, h, x, log_px, kl, kl_weight):
        """Per-example loss (B,) from log_px (mean over L samples) and KL: the weighted negative ELBO."""
        return -log_px + kl_weight * kl

    def diagnostics(self, model, x8):
        """Extra numbers for likelihoods.csv on the test images x8: {column: value}."""
        return {}


FITS = {  # --fit: what a density trains on -> the name of that data
    'discrete': '8-bit levels',     # the exact mass of each 8-bit bin: what it is scored on
    'dequantised': 'dequantised',   # (v + u)/256: its ELBO bounds the 8-bit log-probability from below
    'gray': 'gray values',          # v/255, common practice: atoms at 0 and 1, an unbounded density
}


def levels(x):
    """Gray values v/255 (float) -> the 8-bit values v (uint8)."""
    return torch.round(x * 255).to(torch.uint8)


class DensityLik(Likelihood):
    """A density on [0, 1] (or R), scored exactly: P(v | z) is its integral over v's bin
    [v/256, (v+1)/256) (log_interval; the end bins take the tails), float64. --fit (FITS) chooses
    what it trains on; with 'discrete' log_prob is that score of the levels v/255 it is given."""
    density = True
    options = {'fit': Option(str, 'discrete', 'what it trains on. discrete: the exact mass of each 8-bit bin, what '
                             'it is scored on; dequantised: (v + u)/256, a lower bound; gray: v/255, common practice '
                             '(an unbounded density at 0 and 1)', choices=tuple(FITS))}
    fits = options['fit'].choices    # its default first
    before_options = {'fit': 'gray'}
    margin = 0.0      # gray values kept this far inside [0, 1] (a Beta's density is infinite at the ends)

    @property
    def data_name(self):
        return FITS[self.fit]

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

    def log_pixels(self, h, x8):
        """Exact log P(x8 | z) per pixel (..., 1, H, W), float64."""
        lo, hi = bin_edges(x8)
        lo, hi = lo.masked_fill(x8 == 0, -math.inf), hi.masked_fill(x8 == 255, math.inf)
        return self.log_interval(self.params(h).double(), lo, hi)

    def log_bins(self, h, x8):
        """Exact log P(x8 | z) per image, differentiable (float64 inside, float32 out)."""
        return self.log_pixels(h, x8).flatten(-3).sum(-1).float()

    def log_prob_symbols(self, h):
        """Each 8-bit value's exact bin mass."""
        v = torch.arange(256, device=h.device, dtype=torch.uint8).view((256,) + (1,) * h.dim())
        return self.log_pixels(h, v).movedim(0, -1)

    def log_prob_8bit(self, h, x8, log_px=None):
        return log_px if self.fit == 'discrete' and log_px is not None else self.log_bins(h, x8)


class BernoulliLik(Likelihood):
    """Binarised pixels; training batches are re-binarised each time (dynamic binarisation).
    Binarised digits are another data set: no 8-bit score."""
    data_name = 'binarised'
    scored = False
    symbols = 2

    def data(self, x8, generator=None):
        return torch.bernoulli(x8.float() / 255, generator=generator)

    def dist(self, params):
        return images(Bernoulli(logits=pixel(params[..., 0]), validate_args=False))

    def log_prob_8bit(self, h, x8, log_px):
        return None

    def coded(self, x8):
        """Its fixed binarisation of x8 (eval_data), as 0 and 255."""
        return (eval_data(self, x8) * 255).to(torch.uint8)

    def log_prob_symbols(self, h):
        logits = self.params(h).double()                                 # (..., H, W, 1)
        return torch.cat([F.logsigmoid(-logits), F.logsigmoid(logits)], -1).unsqueeze(-4)


class ContinuousBernoulliLik(DensityLik):
    """Continuous Bernoulli, exact at any logit (distributions.ContinuousBernoulli)."""
    diagnostic_columns = {   # column -> what it is, for the comparison's report
        'cb_gray_elbo_nats': 'ELBO on gray values with the normalised density',
        'cb_gray_bce_elbo_nats': "with 'Bernoulli on gray values' in its place (unnormalised, not a "
                                 'log-probability)',
        'cb_gray_normaliser_nats': 'the normaliser that one leaves out, their difference'}

    def dist(self, params):
        return images(ContinuousBernoulli(pixel(params[..., 0]), validate_args=False))

    def log_interval(self, params, lo, hi):
        return ContinuousBernoulli(pixel(params[..., 0])).log_interval(lo.clamp(0, 1), hi.clamp(0, 1))

    @torch.inference_mode()
    def diagnostics(self, model, x8, batch=500):
        """ELBO on gray values x/255 with the normalised density, and with the unnormalised
        "Bernoulli on gray values" (binary cross-entropy) in its place: the gap is the normaliser."""
        gen, proper, bce = torch.Generator(x8.device).manual_seed(EVAL_SEED), 0.0, 0.0
        for x in (xb.float() / 255 for xb in x8.split(batch)):
            h, mu, logvar = model(x, generator=gen)
            kl = kl_normal(mu, logvar)
            proper += (self.log_density(h, x).mean(0) - kl).sum().item()     # the density, whatever its fit
            bce_px = images(Bernoulli(logits=pixel(self.params(h)[..., 0]), validate_args=False)).log_prob(x)
            bce += (bce_px.mean(0) - kl).sum().item()
        n = x8.shape[0]
        return {'cb_gray_elbo_nats': proper / n, 'cb_gray_bce_elbo_nats': bce / n,
                'cb_gray_normaliser_nats': (proper - bce) / n}


class GaussianLik(DensityLik):
    """Normal with a learned per-pixel mean and std, the std floored at 0.001 (0.256 bins), on gray
    values at 0.01: there the density of the many 0 pixels grows without bound as it shrinks."""
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
    """Normal with a learned per-pixel mean and one learned std for all pixels (sigma-VAE, Rybkin et al. 2021)."""
    channels = 1
    before_options = {}

    def __init__(self, features, **options):
        super().__init__(features, **options)
        self.raw_scale = nn.Parameter(torch.zeros(()))    # std softplus(0) + 0.01 = 0.70 at the start

    def scale(self, params):
        return positive(self.raw_scale.to(params.dtype), self.std_floor).expand(pixel(params[..., 0]).shape)


class FixedGaussianLik(GaussianLik):
    """Normal with a fixed std sigma; with --fit gray trained in the MSE form (KL weight sigma^2 / 784)."""
    channels = 1
    options = {'sigma': Option(float, 0.1, 'the fixed std, beta^(-1/2)', range=(1e-3, 1e3), tag='-sigma{:g}'),
               **DensityLik.options}
    mse_form = 'the MSE form with KL weight lambda'

    def __init__(self, features, **options):
        super().__init__(features, **options)
        if self.fit == 'gray':   # lambda = sigma^2/N: the loss is then the -ELBO times 2 sigma^2/N, plus a constant
            self.loss_form, self.default_kl_weight = self.mse_form, self.sigma ** 2 / N_PIXELS

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
    """Uniform dequantisation (Theis et al. 2016): v -> (v + u)/256 in v's bin, kept 1e-6 inside (0, 1)."""
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
        # each channel contiguous first: float64 softplus is vectorised only there (7x faster)
        a, b = (positive(pixel(params[..., i].contiguous()), self.floor) for i in (0, 1))
        return beta_log_interval(a, b, lo.clamp(0, 1), hi.clamp(0, 1))


class CategoricalLik(Likelihood):
    """Categorical over K bins, v in bin floor(v K / 256) (in [0, 1]: bin / (K - 1)); with K < 256 the
    8-bit score spreads each bin's mass uniformly over its values."""
    options = {'bins': Option(int, 256, 'number of levels K', range=(2, 256), tag='-K{}')}

    def __init__(self, features, **options):
        super().__init__(features, **options)
        # log of how many 8-bit values each bin holds (not a buffer: checkpoints stay as they are)
        self.log_bin_size = torch.bincount(torch.arange(256) * self.bins // 256, minlength=self.bins).float().log()

    @property
    def channels(self):
        return self.bins

    @property
    def data_name(self):
        return '8-bit levels' if self.bins == 256 else f'{self.bins} bins'

    def data(self, x8, generator=None):
        return torch.div(x8.long() * self.bins, 256, rounding_mode='floor').float() / (self.bins - 1)

    def dist(self, params):
        return images(Categorical(logits=params.unsqueeze(-4), validate_args=False))

    def log_prob(self, h, x):
        """Equals self(h).log_prob(bin index), through the fused head + normaliser."""
        target = torch.round(x * (self.bins - 1)).long().squeeze(-3).expand(h.shape[:-1])
        nll = CategoricalHeadNLL.apply(h.reshape(-1, h.shape[-1]), self.head.weight,
                                        self.head.bias, target.reshape(-1))
        return -nll.view(h.shape[:-3] + (-1,)).sum(-1)  # (...,) nats per image

    def log_prob_8bit(self, h, x8, log_px):
        """log P(bin) - log(number of 8-bit values in the bin), per pixel."""
        if self.bins == 256:
            return log_px
        log_size = self.log_bin_size.to(x8.device)
        return log_px - log_size[x8.long() * self.bins // 256].flatten(-3).sum(-1)

    def per_pixel(self, h, fn, rows=4096):
        """fn(probs (r, K), rows) -> (r,) over chunks of h's pixels (all at once: 9x slower) -> (..., 1, H, W)."""
        hf = h.reshape(-1, h.shape[-1])                   # (N, F)
        out = torch.empty(hf.shape[0], device=h.device)
        for s in range(0, hf.shape[0], rows):
            out[s:s + rows] = fn(self.head(hf[s:s + rows].float()).softmax(-1), slice(s, s + rows))
        return pixel(out.view(h.shape[:-1]))

    def mean(self, h):
        levels = torch.linspace(0, 1, self.bins, device=h.device)
        return self.per_pixel(h, lambda p, _: p @ levels)

    def log_prob_symbols(self, h):
        """Each 8-bit value's log P(its bin) - log(the bin's size)."""
        idx = torch.arange(256, device=h.device) * self.bins // 256
        log_p = torch.log_softmax(self.params(h).double(), -1).unsqueeze(-4)     # (..., 1, H, W, K)
        return log_p[..., idx] - self.log_bin_size.to(h.device, torch.float64)[idx]

    def sample(self, h):
        """By inverse CDF, 15x faster than torch's multinomial."""
        u = torch.rand(h.shape[:-1].numel(), 1, device=h.device)
        inverse = lambda p, s: (p.cumsum(-1) < u[s] * p.sum(-1, keepdim=True)).sum(-1)     # noqa: E731
        return self.per_pixel(h, inverse).clamp_max(self.bins - 1) / (self.bins - 1)


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
    options = {'mixtures': Option(int, 5, 'components per pixel', range=(1, 64), tag='-m{}')}

    @property
    def channels(self):
        return 3 * self.mixtures

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
    """A validation/test set with the same noise (binarisation, dequantisation) for every run and device."""
    return lik.data(x8.cpu(), torch.Generator().manual_seed(EVAL_SEED)).to(x8.device)


# -----------------------------------------------------------------------------
# the VAE

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16}  # --precision -> autocast dtype of the networks


def reparameterize(mu, logvar, samples=1, generator=None):
    """z = mu + sigma * eps, eps ~ N(0, I): (B, D) -> (L, B, D)."""
    eps = torch.randn((samples,) + mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + (0.5 * logvar).exp() * eps


def kl_normal(mu, logvar):
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form (Kingma & Welling, App. B): (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)


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
        # He initialisation: with PyTorch's default the signal shrinks and the posterior collapses (measurements.md)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
                nn.init.zeros_(m.bias)
        # channels-last (NHWC): faster on the CPU (measurements.md), and decode's permute is free
        self.to(memory_format=torch.channels_last)

    def encode(self, x):
        return self.encoder(x).chunk(2, dim=-1)  # mu, logvar (B, D)

    def decode(self, z):
        """z (..., D) -> per-pixel features (..., 28, 28, 16), the input of self.lik."""
        h = self.decoder(z.flatten(0, -2))               # (N, 16, 28, 28)
        return h.permute(0, 2, 3, 1).unflatten(0, z.shape[:-1])

    def draw(self, x, samples=1, generator=None, dtype=None):
        """forward, also returning the draws z (L, B, D) themselves (for the IWAE bound)."""
        with utils.autocast(x.device, dtype):
            mu, logvar = self.encode(x)
        mu, logvar = mu.float(), logvar.float()             # q(z|x), its noise and the KL in fp32
        z = reparameterize(mu, logvar, samples, generator)  # (L, B, D)
        with utils.autocast(x.device, dtype):
            h = self.decode(z)
        return z, h, mu, logvar

    def forward(self, x, samples=1, generator=None, dtype=None):
        """x (B, 1, 28, 28) -> features h (L, B, 28, 28, 16), mu (B, D), logvar (B, D) (float32);
        with dtype (torch.bfloat16) the two networks run under autocast to it, h in that dtype."""
        z, h, mu, logvar = self.draw(x, samples, generator, dtype)
        return h, mu, logvar        # h in the networks' dtype: each likelihood computes in fp32 from it


def elbo_terms(model, x, samples=1, generator=None, dtype=None):
    """Per-image E_q[log p(x|z)] (mean over L samples) and KL (B,), and the features h: the ELBO
    log_px - kl with KL weight 1 and the likelihood's normalised log_prob of its data."""
    h, mu, logvar = model(x, samples, generator, dtype)
    return model.lik.log_prob(h, x).mean(0), kl_normal(mu, logvar), h


def log_prior_ratio(z, mu, logvar):
    """log p(z) - log q(z|x) of draws z (K, B, D) from q = N(mu, diag(exp(logvar))): (K, B)."""
    return Normal(0.0, 1.0).log_prob(z).sum(-1) - Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)


def iwae_terms(model, x, k, generator=None, dtype=None):
    """The k-sample bound log mean_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x) (Burda et al. 2016) per image
    (B,); also the mean of log p(x|z_i) and the KL (B,), whose difference is those draws' ELBO."""
    z, h, mu, logvar = model.draw(x, k, generator, dtype)     # z (K, B, D), h (K, B, 28, 28, F)
    log_px = model.lik.log_prob(h, x)                         # (K, B)
    bound = torch.logsumexp(log_px + log_prior_ratio(z, mu, logvar), 0) - math.log(k)
    return bound, log_px.mean(0), kl_normal(mu, logvar)


def elbo_objective(model, x, args, dtype=None):
    """--objective elbo: the negative ELBO in the likelihood's loss form, the KL weighted by
    --kl-weight, over L = --samples draws of z. -> (loss (B,), ELBO (B,))."""
    log_px, kl, h = elbo_terms(model, x, args.samples, dtype=dtype)
    return model.lik.loss(h, x, log_px, kl, kl_weight(model.lik, args)), log_px - kl


def kl_weight(lik, args):
    """The KL weight of --objective elbo: --kl-weight, else the likelihood's default."""
    return lik.default_kl_weight if args.kl_weight is None else args.kl_weight


def iwae_objective(model, x, args, dtype=None):
    """--objective iwae: the negative K-sample bound (K = --iw-samples) on the likelihood's
    normalised log-probability. -> (loss (B,), the ELBO of the same draws (B,))."""
    bound, log_px, kl = iwae_terms(model, x, args.iw_samples, dtype=dtype)
    return -bound, log_px - kl


OBJECTIVES = {'elbo': elbo_objective, 'iwae': iwae_objective}   # --objective name -> its loss


# -----------------------------------------------------------------------------
# estimators of log p(x): importance sampling with the encoder as proposal

def chunk(device):
    """Decoder passes per estimator call: few on a CPU (its caches), many on a GPU (not measured)."""
    return 256 if device.type == 'cpu' else 8192


class Estimate(NamedTuple):
    """Per image, of the data, the 8-bit images and the dequantisation bound (None: not asked or defined),
    the log weights log p(., z_i) - log q(z_i|x) (K, B) or their IWAE estimates (n,); the mean
    log p(x|z) (recon), the closed-form KL and the posterior means mu (n, D)."""
    data: torch.Tensor
    exact8: torch.Tensor = None
    bound: torch.Tensor = None
    recon: torch.Tensor = None
    kl: torch.Tensor = None
    mu: torch.Tensor = None

    @property
    def ranked(self):
        """The exact 8-bit estimate where there is one (what comparisons rank), else the data's."""
        return self.data if self.exact8 is None else self.exact8


@torch.inference_mode()
def log_weights(model, x, k, generator=None, x8=None, xdeq=None):
    """An Estimate of the (k, B) weights of k draws z_i ~ q(z|x) for the likelihood's data x (B, 1, 28, 28),
    its 8-bit images x8 and their dequantisation xdeq (the bound's data: log p(xdeq|z) - 784 log 256)."""
    mu, logvar = model.encode(x)                          # (B, D)
    kc = max(1, min(k, chunk(x.device) // x.shape[0]))    # draws per decoder call
    own = xdeq is not None and torch.equal(xdeq, x)       # a dequantised density's own data: its log p is lpx
    data, exact8, bound, recon = [], [], [], 0.0
    for s in range(0, k, kc):
        z = reparameterize(mu, logvar, min(kc, k - s), generator)   # (c, B, D)
        h = model.decode(z)                                         # (c, B, 28, 28, F)
        log_prior = log_prior_ratio(z, mu, logvar)                  # (c, B)
        lpx = model.lik.log_prob(h, x)                              # (c, B)
        data.append(lpx + log_prior)
        lp8 = None if x8 is None else model.lik.log_prob_8bit(h, x8, lpx)
        if lp8 is not None:
            exact8.append(lp8 + log_prior)
        if xdeq is not None:
            bound.append((lpx if own else model.lik.log_density(h, xdeq)) - N_PIXELS * LOG256 + log_prior)
        recon = recon + lpx.sum(0)
    return Estimate(*(torch.cat(v) if v else None for v in (data, exact8, bound)), recon / k, kl_normal(mu, logvar), mu)


def iwae(lw, k):
    """IWAE estimates of log p(x) from log weights (K, B), averaged over the K // k disjoint
    groups of k draws: (B,). Each is a lower bound on log p(x) in expectation, tighter as k grows."""
    groups = lw[: lw.shape[0] // k * k].view(-1, k, lw.shape[1])
    return (torch.logsumexp(groups, 1) - math.log(k)).mean(0)


def importance_log_px(model, x, k, generator=None, x8=None, xdeq=None):
    """log p by importance sampling (IWAE, k draws) of every image, in batches: an Estimate of (n,)."""
    from tqdm import tqdm
    c = chunk(x.device)
    b = max(1, c // min(k, c))
    cut = lambda t, s: None if t is None else t[s:s + b]     # noqa: E731
    parts = [log_weights(model, x[s:s + b], k, generator, cut(x8, s), cut(xdeq, s))
             for s in tqdm(range(0, x.shape[0], b), 'log p(x)', leave=False, disable=None)]
    est = [None if w[0] is None else iwae(torch.cat(w, 1), k) for w in zip(*(p[:3] for p in parts))]
    return Estimate(*est, *(torch.cat(v) for v in zip(*(p[3:] for p in parts))))


def build(args):
    """The model (its likelihood model.lik) from a checkpoint's dict of training arguments."""
    lik = make_likelihood(args['dist'], VAE.features, **args)
    return VAE(lik, args['latent_dim'])


def load_checkpoint(path, device='cpu'):
    """A model.pt written by train.py -> (model in eval mode, checkpoint dict); anything else
    (see utils.read_torch_file, or another project's checkpoint) raises ValueError."""
    ckpt = utils.read_torch_file(path, device)
    if not isinstance(ckpt, dict) or ckpt.get('format') != CKPT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by this project's train.py")
    cls = LIKELIHOODS.get(ckpt['args']['dist'], Likelihood)
    model = build({**cls.before_options, **ckpt['args']})     # the options it trained with, where older than them
    model.load_state_dict(ckpt['state_dict'])
    return model.to(device).eval(), ckpt
