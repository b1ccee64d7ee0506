"""Sample quality, judged by a digit classifier trained here.

    python quality.py --data-dir ../shared/mnist        # trains runs/classifier/ (make classifier)

- Classifier: a small CNN trained on the 50,000 training images. No download: Inception's
  weights cannot be fetched here, and Inception is the wrong judge for 28x28 digits. Its
  penultimate features (128) are the space of the Fréchet distance, its softmax p(y|x) gives
  the inception score and the entropy of the predicted labels.
- frechet_distance: torchmetrics' FrechetInceptionDistance on those features, in float64.
- sample_quality(model, clf, x8, labels): the columns compare_likelihoods.py adds per run, for
  both things a user would show of a prior sample z ~ N(0, I): the decoder's mean and a sample
  of p(x|z), each clipped to [0, 1] as the figures show them.
The classifier's run directory is locked, written atomically and resumed as a VAE run is.
"""
import utils
if __name__ == '__main__':
    utils.one_line_errors()   # first: from here on Ctrl-C, a full disk or OOM is one line, not a traceback

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vae  # noqa: E402
from utils import number  # noqa: E402

CLF_FORMAT = 'conv-vae-likelihoods/classifier/1'
QUALITY_COLUMNS = {   # column of likelihoods.csv -> what it is
    'fd_decoder_mean': 'Fréchet distance to the test images, decoder means of prior samples',
    'fd_px_sample': 'Fréchet distance to the test images, samples of p(x|z) of prior samples',
    'fd_decoder_mean_stderr': "its standard error over the prior samples (bootstrap; the figure's error bars)",
    'fd_px_sample_stderr': "the same for the samples of p(x|z)",
    'is_decoder_mean': 'classifier inception score of the decoder means (10 = every digit, confidently)',
    'is_px_sample': 'classifier inception score of the samples of p(x|z)',
    'label_entropy_decoder_mean': 'entropy of the predicted labels of the decoder means, nats (log 10 = 2.303 uniform)',
    'label_entropy_px_sample': 'entropy of the predicted labels of the samples of p(x|z), nats',
    'recon_accuracy': 'classifier accuracy on the decoder means of the test images at their posterior means',
}


class Classifier(nn.Module):
    """Two conv layers and a 128-unit layer, whose output (after ReLU) is the feature space; small,
    so that judging 30,000 images per model stays a few per cent of its evaluation."""
    num_features = 128

    def __init__(self):
        super().__init__()
        block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(True), nn.MaxPool2d(2)]  # noqa: E731
        self.body = nn.Sequential(
            *block(1, 32),                                      # (B, 32, 14, 14)
            *block(32, 64),                                     # (B, 64, 7, 7)
            nn.Flatten(), nn.Linear(64 * 7 * 7, self.num_features), nn.BatchNorm1d(self.num_features), nn.ReLU(True))
        self.out = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.num_features, 10))

    def features(self, x):
        """Images (B, 1, 28, 28) in [0, 1] -> penultimate features (B, 128)."""
        return self.body(x)

    def forward(self, x):
        return self.out(self.body(x))    # (B, 10) logits


class _Given(nn.Module):
    """torchmetrics' feature extractor for features computed already: the identity."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, f):
        return f


def frechet_distance(real, fake):
    """Fréchet distance between Gaussians fitted to two sets of features (N, d), (M, d): float."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    fid = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return fid.compute().item()


def frechet_stderr(real, fake, draws=10, seed=0):
    """Bootstrap standard error of frechet_distance(real, fake) over fake's rows: the spread a new
    set of samples from the same model would give (the test set, real, is the same every time)."""
    gen = torch.Generator().manual_seed(seed)
    fds = [frechet_distance(real, fake[torch.randint(len(fake), (len(fake),), generator=gen)]) for _ in range(draws)]
    return torch.tensor(fds).std().item()


def inception_score(probs):
    """exp(E_x KL(p(y|x) || p(y))) of class probabilities (N, 10), and the entropy of p(y) in nats."""
    p_y = probs.mean(0)
    kl = (probs * (probs.clamp_min(1e-30).log() - p_y.clamp_min(1e-30).log())).sum(1).mean()
    return kl.exp().item(), -(p_y * p_y.clamp_min(1e-30).log()).sum().item()


@torch.inference_mode()
def judge(clf, x, batch=1000):
    """Features (N, 128) and class probabilities (N, 10) of images x (N, 1, 28, 28) in [0, 1]."""
    feats = [clf.features(xb) for xb in x.split(batch)]
    feats = torch.cat(feats)
    return feats, clf.out(feats).softmax(-1)


@torch.inference_mode()
def sample_quality(model, clf, x8, labels, n=10000, real=None, seed=vae.EVAL_SEED, batch=500):
    """QUALITY_COLUMNS of a VAE: n prior samples against the test images x8 (N, 1, 28, 28) uint8
    (real: their features, judge(clf, x8 / 255)[0], where computed already), and the classifier's
    accuracy on the reconstructions (decoder means at the posterior means)."""
    lik, out = model.lik, {}
    shown = {'decoder_mean': [], 'px_sample': []}
    with torch.random.fork_rng([x8.device] if x8.device.type == 'cuda' else []):   # p(x|z)'s samples draw from it
        torch.manual_seed(seed)
        for s in range(0, n, batch):
            z = torch.randn(min(batch, n - s), model.latent_dim, device=x8.device)   # (b, D)
            h = model.decode(z)                                                     # (b, 28, 28, F)
            shown['decoder_mean'].append(lik.mean(h).clamp(0, 1))
            shown['px_sample'].append(lik.sample(h).clamp(0, 1))
    real_feats = judge(clf, x8.float() / 255)[0] if real is None else real
    for what, imgs in shown.items():
        feats, probs = judge(clf, torch.cat(imgs))
        out[f'fd_{what}'] = frechet_distance(real_feats, feats)
        out[f'fd_{what}_stderr'] = frechet_stderr(real_feats, feats)
        out[f'is_{what}'], out[f'label_entropy_{what}'] = inception_score(probs)
    recon = [lik.mean(model.decode(model.encode(vae.eval_data(lik, xb))[0])).clamp(0, 1) for xb in x8.split(batch)]
    _, probs = judge(clf, torch.cat(recon))
    out['recon_accuracy'] = (probs.argmax(1) == labels).float().mean().item()
    return out


def load_classifier(path, device='cpu'):
    """runs/classifier/model.pt -> the classifier in eval mode, and its checkpoint dict."""
    ckpt = utils.read_torch_file(path, device)
    if not isinstance(ckpt, dict) or ckpt.get('format') != CLF_FORMAT:
        raise ValueError(f"{path} is not a classifier written by this project's quality.py")
    clf = Classifier()
    clf.load_state_dict(ckpt['state_dict'])
    return clf.to(device).eval(), ckpt


# -----------------------------------------------------------------------------
# training the classifier


def shifted(x, gen, pixels=2):
    """Each image moved by up to `pixels` in x and y (bilinear): the augmentation that lets a
    small CNN reach 99.3 % on the test set."""
    t = (torch.rand(x.shape[0], 2, generator=gen, device=x.device) * 2 - 1) * (2 * pixels / x.shape[-1])
    theta = torch.cat([torch.eye(2, device=x.device).expand(x.shape[0], 2, 2), t[:, :, None]], 2)   # (B, 2, 3)
    return F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)


@torch.inference_mode()
def accuracy(clf, x8, labels):
    clf.eval()
    return (judge(clf, x8.float() / 255)[1].argmax(1) == labels).float().mean().item()


def fit(clf, data, args, last, gen):
    """Adam with a cosine schedule for --epochs, last.pt after each epoch (resumed from there);
    the epoch with the best validation accuracy is kept. Returns the state of the run."""
    x8, labels = data['train']
    opt = torch.optim.Adam(clf.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * math.ceil(len(x8) / args.batch_size))
    state = {'epoch': 0, 'best': -1.0, 'best_epoch': None, 'best_state': None}
    if os.path.exists(last):
        saved = utils.or_exit(utils.read_torch_file, last)
        changed = [k for k in ('epochs', 'batch_size', 'lr', 'seed') if saved['args'][k] != getattr(args, k)]
        if changed:
            raise SystemExit(f"error: {last} was trained with other {', '.join('--' + k.replace('_', '-') for k in changed)}; "
                             f"delete {os.path.dirname(last) or '.'} to start over")
        clf.load_state_dict(saved['state_dict'])
        opt.load_state_dict(saved['optimizer'])
        sched.load_state_dict(saved['scheduler'])
        gen.set_state(saved['generator'])
        torch.set_rng_state(saved['torch_rng'])
        state = saved['state']
        print(f"resuming {last} after epoch {state['epoch']}")
    for epoch in range(state['epoch'] + 1, args.epochs + 1):
        clf.train()
        start, total = time.time(), 0.0
        for idx in torch.randperm(len(x8), generator=gen).split(args.batch_size):
            loss = F.cross_entropy(clf(shifted(x8[idx].float() / 255, gen)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        val = accuracy(clf, *data['val'])
        if val > state['best']:
            state.update(best=val, best_epoch=epoch, best_state={k: v.clone() for k, v in clf.state_dict().items()})
        state['epoch'] = epoch
        print(f'epoch {epoch:2d}/{args.epochs}  loss {total / len(x8):.4f}  val accuracy {val:.4f}  '
              f'{time.time() - start:.1f} s', flush=True)
        utils.save_torch({'state_dict': clf.state_dict(), 'optimizer': opt.state_dict(), 'scheduler': sched.state_dict(),
                          'generator': gen.get_state(), 'torch_rng': torch.get_rng_state(), 'state': state,
                          'args': vars(args)}, last)
    return state


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data-dir', default='data')
    p.add_argument('--out-dir', default='runs/classifier')
    p.add_argument('--epochs', type=number(int, 1, 1000), default=10)
    p.add_argument('--batch-size', type=number(int, 1, 50000), default=128)
    p.add_argument('--lr', type=number(float, 0, 1, low_open=True), default=2e-3)
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    """Train (or resume) the classifier into --out-dir/model.pt; returns its checkpoint dict."""
    args = parse_args(argv)
    data = utils.or_exit(utils.load_mnist, args.data_dir, errors=utils.DataError)
    utils.writable_dir(args.out_dir, '--out-dir', ['model.pt', 'last.pt'])
    lock = utils.lock_dir(args.out_dir)
    try:
        torch.manual_seed(args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        clf = Classifier()
        print(f'training the judge classifier on {len(data["train"][0])} images -> {args.out_dir}', flush=True)
        state = fit(clf, data, args, os.path.join(args.out_dir, 'last.pt'), gen)
        clf.load_state_dict(state['best_state'])
        test = accuracy(clf, *data['test'])
        ckpt = {'format': CLF_FORMAT,
                'state_dict': state['best_state'],
                'epoch': state['best_epoch'],
                'val_accuracy': state['best'],
                'test_accuracy': test,
                'args': vars(args),
                'torch': str(torch.__version__)}
        utils.save_torch(ckpt, os.path.join(args.out_dir, 'model.pt'))
        print(f"test accuracy {test:.4f} (epoch {state['best_epoch']}, val {state['best']:.4f}) "
              f"-> {os.path.join(args.out_dir, 'model.pt')}")
        return ckpt
    finally:
        lock.close()


if __name__ == '__main__':
    main()
