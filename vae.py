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
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import (Bernoulli, Beta, Categorical, ContinuousBernoulli,
                                 Distribution, Independent, Normal, constraints)
from torch.distributions.utils import broadcast_all

N_PIXELS = 784
EVAL_SEED = 1234  # fixed noise for validation/test binarisation and dequantisation
CKPT_FORMAT = 'conv-vae-likelihoods/1'
MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
               't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')

# -----------------------------------------------------------------------------
# data


class DataError(Exception):
    """The MNIST files are missing or unreadable; the message says what to do."""


def load_mnist(root):
    """MNIST as uint8 tensors: train = first 50,000 of the official training set,
    val = its last 10,000, test = the official 10,000. Images (N, 1, 28, 28), labels (N,)."""
    from torchvision import datasets
    raw = os.path.join(root, 'MNIST', 'raw')
    present = all(os.path.isfile(os.path.join(raw, f)) for f in MNIST_FILES)
    try:
        train = datasets.MNIST(root, train=True, download=True)
        test = datasets.MNIST(root, train=False, download=True)
    except Exception as e:  # offline download, unreadable files, ...
        if present:
            raise DataError(f'the MNIST files in {raw}/ could not be read ({type(e).__name__}): truncated or '
                            f'damaged; replace them with the original files') from e
        raise DataError(f"could not load or download MNIST ({type(e).__name__}); put the four "
                        f"files {', '.join(MNIST_FILES)} (uncompressed) into {raw}/") from e
    for part, n in [(train, 60000), (test, 10000)]:   # files that parse but hold the wrong data
        labels = part.targets
        if part.data.shape != (n, 28, 28) or labels.shape != (n,) or labels.min() < 0 or labels.max() > 9:
            raise DataError(f'the MNIST files in {raw}/ are damaged: expected {n} images of 28 x 28 with labels 0-9, '
                            f'got images {tuple(part.data.shape)}; replace them with the original files')
    x, y = train.data.unsqueeze(1), train.targets  # (60000, 1, 28, 28) uint8
    return {'train': (x[:50000], y[:50000]), 'val': (x[50000:], y[50000:]),
            'test': (test.data.unsqueeze(1), test.targets)}


# -----------------------------------------------------------------------------
# likelihoods p(x|z): one registry, each entry turns decoder output into a distribution


def positive(raw, floor):
    """Unconstrained -> (floor, inf): scales and concentrations never reach 0."""
    return F.softplus(raw) + floor


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
    never holds the (M, K) logits (200 MB for a batch), which makes a 256-way categorical
    2x cheaper to train. The backward recomputes each chunk's logits:
    d nll / d logits = softmax - onehot."""
    chunk = 4096

    @staticmethod
    def forward(ctx, h, weight, bias, target):
        nll = h.new_empty(h.shape[0])
        for s in range(0, h.shape[0], _CategoricalHeadNLL.chunk):
            sl = slice(s, s + _CategoricalHeadNLL.chunk)
            logp = torch.log_softmax(torch.addmm(bias, h[sl], weight.t()), -1)  # (chunk, K)
            nll[sl] = -logp.gather(-1, target[sl, None]).squeeze(-1)
        ctx.save_for_backward(h, weight, bias, target)
        return nll

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, target = ctx.saved_tensors
        gh, gw, gb = torch.empty_like(h), torch.zeros_like(weight), torch.zeros_like(bias)
        for s in range(0, h.shape[0], _CategoricalHeadNLL.chunk):
            sl = slice(s, s + _CategoricalHeadNLL.chunk)
            p = torch.softmax(torch.addmm(bias, h[sl], weight.t()), -1)  # (chunk, K)
            p.scatter_add_(-1, target[sl, None], p.new_full((p.shape[0], 1), -1.0))
            p.mul_(grad[sl, None])
            gh[sl] = p @ weight
            gw.addmm_(p.t(), h[sl])
            gb += p.sum(0)
        return gh, gw, gb, None


class Likelihood(nn.Module):
    """p(x|z) for one --dist: a per-pixel linear head (decoder features -> unconstrained
    parameters, `channels` per pixel) and `dist`, which applies the constraints and returns
    a torch.distributions distribution over whole images. The base models gray values."""
    channels = 1
    default_kl_weight = 1.0

    def __init__(self, features, **_):
        super().__init__()
        self.head = nn.Linear(features, self.channels)

    def data(self, x8, generator=None):
        """uint8 images (B, 1, 28, 28) -> the float images in [0, 1] this likelihood models."""
        return x8.float() / 255

    def dist(self, params):
        """Unconstrained params (..., H, W, C) -> distribution over images (..., 1, H, W)."""
        raise NotImplementedError

    def forward(self, h):
        """Decoder features (..., H, W, F) -> p(x|z)."""
        return self.dist(self.head(h))

    def log_prob(self, h, x):
        return self(h).log_prob(x)  # (...,) nats per image

    def mean(self, h):
        return self(h).mean

    def sample(self, h):
        return self(h).sample()

    def loss(self, h, x, log_px, kl, kl_weight):
        """Per-example training loss (B,) from log_px = E_q[log p(x|z)] (mean over the L
        samples) and KL: the negative ELBO, with the KL weighted by kl_weight."""
        return -log_px + kl_weight * kl


class BernoulliLik(Likelihood):
    """Binarised pixels; training batches are re-binarised each time (dynamic binarisation)."""

    def data(self, x8, generator=None):
        return torch.bernoulli(x8.float() / 255, generator=generator)

    def dist(self, params):
        return images(Bernoulli(logits=pixel(params[..., 0]), validate_args=False))


class ContinuousBernoulliLik(Likelihood):
    def dist(self, params):
        return images(ContinuousBernoulli(logits=pixel(params[..., 0]), validate_args=False))


class GaussianLik(Likelihood):
    """Normal with a learned per-pixel mean and std (std floored). The density of the many
    exactly-0 background pixels grows as their std shrinks, so the floor matters: at 1e-3
    training was unstable (validation ELBO 442, 152, 1035, 336, 1062 over 5 epochs) and
    reconstructions showed wrong digits; at 1e-2 it rose every epoch, to 1781 (measured)."""
    channels = 2
    std_floor = 1e-2

    def dist(self, params):
        loc, scale = pixel(params[..., 0]), positive(pixel(params[..., 1]), self.std_floor)
        return images(Normal(loc, scale, validate_args=False))


class FixedGaussianLik(Likelihood):
    """Normal with a fixed std sigma, trained in the MSE form."""

    def __init__(self, features, sigma=0.1, **_):
        super().__init__(features)
        self.sigma = sigma
        # lambda = 1/(beta N), beta = 1/sigma^2: the MSE-form loss is then the negative
        # ELBO times 2 sigma^2 / N, minus sigma^2 log(2 pi sigma^2).
        self.default_kl_weight = sigma ** 2 / N_PIXELS

    def dist(self, params):
        return images(Normal(pixel(params[..., 0]), self.sigma, validate_args=False))

    def loss(self, h, x, log_px, kl, kl_weight):
        """Mean over pixels of the squared error, averaged over the L samples, plus
        lambda * sum_j(-1 - log s_j^2 + mu_j^2 + s_j^2), which is lambda * 2 KL."""
        mean = pixel(self.head(h)[..., 0])                # (L, B, 1, H, W)
        mse = (x - mean).pow(2).flatten(-3).mean(-1).mean(0)  # (B,)
        return mse + kl_weight * 2 * kl


def dequantize(x8, generator=None):
    """Uniform dequantisation (Theis et al. 2016): 8-bit v -> (v + u)/256, u ~ U[0, 1), which
    lies in v's bin [v/256, (v+1)/256); kept 1e-6 inside (0, 1), where float32 would round."""
    u = torch.rand(x8.shape, generator=generator, device=x8.device)
    return ((x8.float() + u) / 256).clamp(1e-6, 1 - 1e-6)


class BetaLik(Likelihood):
    """Beta on uniformly dequantised gray values (255x + u)/256, u ~ U[0, 1)."""
    channels = 2
    floor = 1e-3

    def data(self, x8, generator=None):
        return dequantize(x8, generator)

    def dist(self, params):
        a, b = (positive(pixel(params[..., i]), self.floor) for i in (0, 1))
        return images(Beta(a, b, validate_args=False))


class CategoricalLik(Likelihood):
    """Categorical over K levels: pixel value v in 0..255 falls in bin floor(v K / 256),
    represented in [0, 1] as bin / (K - 1)."""

    def __init__(self, features, bins=256, **_):
        self.channels = self.bins = bins
        super().__init__(features)

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

    def mean(self, h):
        levels = torch.linspace(0, 1, self.bins, device=h.device)
        return (self(h).base_dist.probs * levels).sum(-1)

    def sample(self, h):
        return self(h).sample().float() / (self.bins - 1)


class LogisticLik(Likelihood):
    """Discretised logistic over the 256 levels of the 8-bit pixels."""
    channels = 2
    scale_floor = 1e-3

    def dist(self, params):
        loc, scale = pixel(params[..., 0]), positive(pixel(params[..., 1]), self.scale_floor)
        return images(DiscretizedLogistic(loc, scale, validate_args=False))


LIKELIHOODS = {  # --dist name -> likelihood; each takes the options it uses (bins, sigma)
    'bernoulli': BernoulliLik,
    'cbernoulli': ContinuousBernoulliLik,
    'gaussian': GaussianLik,
    'gaussian-fixed': FixedGaussianLik,
    'beta': BetaLik,
    'categorical': CategoricalLik,
    'logistic': LogisticLik,
}


def make_likelihood(dist, features=16, bins=256, sigma=0.1):
    return LIKELIHOODS[dist](features, bins=bins, sigma=sigma)


def eval_data(lik, x8):
    """The fixed version of a validation/test set: the same binarisation or dequantisation
    noise for every run and seed, drawn on the CPU so it does not depend on the device."""
    return lik.data(x8.cpu(), torch.Generator().manual_seed(EVAL_SEED)).to(x8.device)


# -----------------------------------------------------------------------------
# the VAE


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
            nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(),   # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),  # (B, 64, 7, 7)
            nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.ReLU(),
            nn.Linear(256, 2 * latent_dim))         # (B, 2D): mean and log-variance
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 256), nn.ReLU(),
            nn.Linear(256, 64 * 7 * 7), nn.ReLU(),
            nn.Unflatten(1, (64, 7, 7)),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),             # (N, 32, 14, 14)
            nn.ConvTranspose2d(32, self.features, 4, 2, 1), nn.ReLU())  # (N, 16, 28, 28)
        self.lik = lik
        # He initialisation. PyTorch's default shrinks the signal about 0.6x per ReLU layer:
        # at this depth z starts as almost pure noise (posterior means vary 100x less than
        # sigma), the decoder learns to ignore it and the posterior collapses (measured).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
                nn.init.zeros_(m.bias)
        # Convolutions in channels-last (NHWC) layout: with it and smaller evaluation chunks,
        # evaluation measured 1.5-2.8x faster on the CPU (README, Speed); decode's permute is free.
        self.to(memory_format=torch.channels_last)

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)  # (B, D) each
        return mu, logvar

    def decode(self, z):
        """z (..., D) -> per-pixel features (..., 28, 28, 16), the input of self.lik."""
        h = self.decoder(z.flatten(0, -2))               # (N, 16, 28, 28)
        return h.permute(0, 2, 3, 1).unflatten(0, z.shape[:-1])

    def forward(self, x, samples=1, generator=None):
        """x (B, 1, 28, 28) -> features h (L, B, 28, 28, 16), mu (B, D), logvar (B, D)."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, samples, generator)  # (L, B, D)
        return self.decode(z), mu, logvar


def elbo_terms(model, x, samples=1, generator=None):
    """Per-image E_q[log p(x|z)] (mean over L samples) and KL (B,), and the features h.
    ELBO = log_px - kl, always with KL weight 1 and the normalised log-density."""
    h, mu, logvar = model(x, samples, generator)
    return model.lik.log_prob(h, x).mean(0), kl_normal(mu, logvar), h


def build(args):
    """The model (with its likelihood, model.lik) from a dict of training arguments,
    as stored in checkpoints."""
    lik = make_likelihood(args['dist'], VAE.features, args['bins'], args['sigma'])
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
    model = build(ckpt['args'])
    model.load_state_dict(ckpt['state_dict'])
    return model.to(device).eval(), ckpt
