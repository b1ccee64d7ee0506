"""Train the conv VAE on MNIST with one observation likelihood.

    python train.py --dist bernoulli --data-dir ../shared/mnist

Writes into --out-dir (default runs/<dist>-z<latent>-s<seed>): model.pt (best checkpoint
by validation ELBO), metrics.csv (one row per epoch), reconstructions.png, samples.png.
All numbers are nats per image; the ELBO always uses the normalised log-density and KL
weight 1, whatever objective (--kl-weight, MSE form) was optimised.
"""
import argparse
import csv
import math
import os
import random
import shlex
import signal
import sys
import time

import torch
from tqdm import tqdm

import vae

METRICS = ['epoch', 'seconds', 'train_loss', 'train_elbo_nats',
           'val_elbo_nats', 'val_recon_nats', 'val_kl_nats']

# -----------------------------------------------------------------------------
# helpers


def number(kind, low=None, high=None, low_open=False):
    """argparse type: kind (int/float) within [low, high] (or (low, high] if low_open)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}")
        if (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
            rng = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
            raise argparse.ArgumentTypeError(f"{v} is outside {rng}")
        return v
    return parse


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit status 2), not the usage block."""
    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (--help lists the flags)\n')


def make_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dist', default='bernoulli', choices=list(vae.LIKELIHOODS), help='likelihood p(x|z)')
    p.add_argument('--latent-dim', type=number(int, 1), default=32)
    p.add_argument('--epochs', type=number(int, 1), default=20)
    p.add_argument('--batch-size', type=number(int, 1), default=256)
    p.add_argument('--lr', type=number(float, 0, low_open=True), default=1e-3)
    p.add_argument('--samples', type=number(int, 1), default=1,
                   help='L: Monte-Carlo samples of z per image for the reconstruction term')
    p.add_argument('--kl-weight', type=number(float, 0), default=None,
                   help='weight of the KL in the training loss (default 1; sigma^2/784 for '
                        'gaussian-fixed, which makes its MSE-form loss the exact negative ELBO up to scale)')
    p.add_argument('--sigma', type=number(float, 0, low_open=True), default=0.1,
                   help='gaussian-fixed: the fixed std, beta^(-1/2)')
    p.add_argument('--bins', type=number(int, 2, 256), default=256, help='categorical: number of levels K')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda', 'mps'])
    p.add_argument('--data-dir', default='data', help='holds MNIST/raw/ (downloaded there if missing)')
    p.add_argument('--out-dir', default=None, help='default: runs/<dist>-z<latent>-s<seed>')
    p.add_argument('--subset', type=number(int, 1, 50000), default=None,
                   help='train on the first N training images only (quick runs)')
    p.add_argument('--resume', action='store_true',
                   help='continue the run in --out-dir from its last.pt (same flags; --epochs may grow)')
    return p


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    if args.out_dir is None:
        args.out_dir = os.path.join('runs', f'{args.dist}-z{args.latent_dim}-s{args.seed}')
    return args


def pick_device(name):
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        if torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        sys.exit('error: --device cuda, but CUDA is not available here (use --device auto or cpu)')
    if name == 'mps' and not torch.backends.mps.is_available():
        sys.exit('error: --device mps, but MPS is not available here (use --device auto or cpu)')
    return torch.device(name)


def atomic_save(obj, path):
    """torch.save to a temporary file in the same directory, then rename into place."""
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_png(fig, path, **kw):
    """fig.savefig to a temporary file in the same directory, then rename into place; close fig."""
    import matplotlib.pyplot as plt
    tmp = path + '.tmp'
    fig.savefig(tmp, format='png', dpi=100, **kw)
    os.replace(tmp, path)
    plt.close(fig)


def write_metrics(rows, path):
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=METRICS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


@torch.inference_mode()
def evaluate(model, x, batch_size=250):
    """Mean ELBO, E_q[log p(x|z)] and KL over the images x, in nats per image, with one
    z per image drawn from a fixed-seed generator (the same numbers for the same weights)."""
    model.eval()
    gen = torch.Generator(x.device).manual_seed(vae.EVAL_SEED)
    recon = kl = 0.0
    for xb in x.split(batch_size):
        log_px, klb, _ = vae.elbo_terms(model, xb, generator=gen)
        recon += log_px.sum().item()
        kl += klb.sum().item()
    n = x.shape[0]
    return {'val_elbo_nats': (recon - kl) / n, 'val_recon_nats': recon / n, 'val_kl_nats': kl / n}


# -----------------------------------------------------------------------------
# figures


def grid(imgs, nrow):
    from torchvision.utils import make_grid
    return make_grid(imgs.clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=0.5)[0].numpy()


@torch.inference_mode()
def save_figures(model, test_x, out_dir, title):
    """reconstructions.png: test digits, the decoder mean and a sample of p(x|z) at z = mu(x);
    samples.png: 64 draws z ~ N(0, I), decoder means next to samples of p(x|z)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    model.eval()
    lik, gen = model.lik, torch.Generator(test_x.device).manual_seed(vae.EVAL_SEED)
    torch.manual_seed(vae.EVAL_SEED)  # the samples of p(x|z) below use the global RNG
    x = test_x[:16]
    h = model.decode(model.encode(x)[0])
    rows = [('test digits (as the likelihood sees them)', x), ('decoder mean', lik.mean(h)),
            ('sample of p(x|z)', lik.sample(h))]
    fig, axes = plt.subplots(3, 1, figsize=(10, 3.6))
    for ax, (name, imgs) in zip(axes, rows):
        ax.imshow(grid(imgs, 16), cmap='gray', vmin=0, vmax=1)
        ax.set_title(name, fontsize=10)
        ax.axis('off')
    fig.suptitle(f'{title}: reconstructions at z = mu(x)')
    save_png(fig, os.path.join(out_dir, 'reconstructions.png'), bbox_inches='tight')

    z = torch.randn(64, model.latent_dim, generator=gen, device=test_x.device)
    h = model.decode(z)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, (name, imgs) in zip(axes, [('decoder mean', lik.mean(h)), ('sample of p(x|z)', lik.sample(h))]):
        ax.imshow(grid(imgs, 8), cmap='gray', vmin=0, vmax=1)
        ax.set_title(name + ' (clipped to [0, 1])' * lik.clipped)
        ax.axis('off')
    fig.suptitle(f'{title}: 64 prior samples z ~ N(0, I)')
    save_png(fig, os.path.join(out_dir, 'samples.png'), bbox_inches='tight')


# -----------------------------------------------------------------------------
# interrupt and resume

LAST_FORMAT = vae.CKPT_FORMAT + '/last'
RESUME_MAY_CHANGE = ('epochs', 'device', 'data_dir', 'out_dir', 'resume')  # all other flags must match


def command(args):
    """The command line that resumes this run: train.py with every flag not at its default."""
    p = make_parser()
    flags = [f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items()
             if k != 'resume' and v != p.get_default(k)]
    return ' '.join(['python train.py'] + flags + ['--resume'])


def rng_states(gen):
    return {'torch': torch.get_rng_state(), 'generator': gen.get_state(), 'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states, gen):
    torch.set_rng_state(states['torch'])
    gen.set_state(states['generator'])
    random.setstate(states['python'])
    if states['cuda']:
        torch.cuda.set_rng_state_all(states['cuda'])


def load_last(args):
    """The training state in <out-dir>/last.pt, checked to come from a run with the same flags."""
    path = os.path.join(args.out_dir, 'last.pt')
    if not os.path.isfile(path):
        sys.exit(f'error: --resume: there is no {path} to resume from (run without --resume to start)')
    try:
        state = vae.read_torch_file(path)
    except ValueError as e:
        sys.exit(f'error: --resume: {e}')
    if not isinstance(state, dict) or state.get('format') != LAST_FORMAT:
        sys.exit(f"error: --resume: {path} was not written by this project's train.py")
    for k, v in state['args'].items():
        if k not in RESUME_MAY_CHANGE and getattr(args, k, None) != v:
            flag = '--' + k.replace('_', '-')
            sys.exit(f'error: --resume: {path} was written with {flag} {v}, this run has {flag} '
                     f'{getattr(args, k, None)}; resume with the same flags or use another --out-dir')
    return state


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


# -----------------------------------------------------------------------------
# training


class NonFiniteLoss(FloatingPointError):
    """The training loss is NaN or inf (args[0]); the optimiser step was not taken."""
    batch = '?'


def train_step(model, opt, x, kl_weight, samples=1):
    """One optimiser step on the batch x (B, 1, 28, 28): forward, the training loss (negative
    ELBO, KL weighted), backward, Adam. Returns the mean loss and the per-image ELBO (B,)."""
    log_px, kl, h = vae.elbo_terms(model, x, samples)
    loss = model.lik.loss(h, x, log_px, kl, kl_weight).mean()
    if not torch.isfinite(loss):
        raise NonFiniteLoss(loss.item())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), (log_px - kl).detach()


def batches(lik, x8, gen, batch_size):
    """The uint8 images x8 (N, 1, 28, 28), already on the device, in an order drawn from gen,
    indexed out batch by batch and turned into the likelihood's data (binarised, dequantised,
    ...) on the fly: (B, 1, 28, 28) floats in [0, 1]."""
    for idx in torch.randperm(x8.shape[0], generator=gen, device=x8.device).split(batch_size):
        yield lik.data(x8[idx], gen)


def train_epoch(model, opt, train_x8, gen, batch_size, kl_weight, samples=1, desc=None):
    """One pass over the training images (see batches). Returns the mean loss and ELBO per image."""
    model.train()
    n, loss_sum, elbo_sum = train_x8.shape[0], 0.0, 0.0
    n_batches = math.ceil(n / batch_size)
    bar = tqdm(batches(model.lik, train_x8, gen, batch_size), desc=desc, total=n_batches,
               leave=False, disable=None, mininterval=1)
    for i, x in enumerate(bar, 1):
        try:
            loss, elbo = train_step(model, opt, x, kl_weight, samples)
        except NonFiniteLoss as e:
            e.batch = f'{i}/{n_batches}'
            raise
        loss_sum += loss.item() * x.shape[0]
        elbo_sum += elbo.sum().item()
        bar.set_postfix(loss=f'{loss.item():.2f}', refresh=False)
    return loss_sum / n, elbo_sum / n


def prepare_out_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        sys.exit(f'error: --out-dir {path} is a file, not a directory')
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        sys.exit(f'error: cannot create --out-dir {path}: {e.strerror}')
    if not os.access(path, os.W_OK | os.X_OK):
        sys.exit(f'error: --out-dir {path} is not writable')


def train(args):
    """Train, writing last.pt and metrics.csv every epoch and model.pt (the best epoch by
    validation ELBO) at the end; Ctrl-C, SIGTERM or a kill leave last.pt for --resume."""
    device = pick_device(args.device)
    state = load_last(args) if args.resume else None
    try:
        data = vae.load_mnist(args.data_dir)
    except vae.DataError as e:
        sys.exit(f'error: {e}')
    prepare_out_dir(args.out_dir)
    torch.manual_seed(args.seed)
    model = vae.build(vars(args)).to(device)
    lik = model.lik
    kl_weight = lik.default_kl_weight if args.kl_weight is None else args.kl_weight
    train_x8 = data['train'][0][:args.subset].to(device)     # (N, 1, 28, 28) uint8
    val_x = vae.eval_data(lik, data['val'][0]).to(device)   # fixed binarisation/noise
    test_x = vae.eval_data(lik, data['test'][0])[:16].to(device)  # as the whole test set is fixed
    gen = torch.Generator(device).manual_seed(args.seed)    # shuffling and data noise
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ckpt_path, last_path = os.path.join(args.out_dir, 'model.pt'), os.path.join(args.out_dir, 'last.pt')
    title = f'{args.dist}, latent dim {args.latent_dim}'
    n, rows, best, best_epoch, best_state, done = train_x8.shape[0], [], -math.inf, None, None, 0

    def save_last():
        atomic_save({'format': LAST_FORMAT, 'args': vars(args), 'epoch': done, 'state_dict': model.state_dict(),
                     'optimizer': opt.state_dict(), 'rng': rng_states(gen), 'rows': rows, 'best': best,
                     'best_epoch': best_epoch, 'best_state': best_state}, last_path)

    if state is not None:
        model.load_state_dict(state['state_dict'])
        opt.load_state_dict(state['optimizer'])
        set_rng_states(state['rng'], gen)
        rows, best, best_epoch, best_state, done = (state[k] for k in ('rows', 'best', 'best_epoch', 'best_state', 'epoch'))
        print(f'resuming {last_path} after epoch {done}', flush=True)
    else:
        if os.path.exists(last_path):
            print(f'note: starting over in {args.out_dir}; its last.pt is replaced (--resume continues a run)')
        save_last()
    print(f'training {args.dist} (latent dim {args.latent_dim}) on {n} images, {device}, '
          f'{sum(p.numel() for p in model.parameters()):,} parameters -> {args.out_dir}', flush=True)

    previous = signal.signal(signal.SIGTERM, raise_interrupt)   # SIGTERM stops like Ctrl-C
    try:
        for epoch in range(done + 1, args.epochs + 1):
            t0 = time.time()
            try:
                train_loss, train_elbo = train_epoch(model, opt, train_x8, gen, args.batch_size, kl_weight,
                                                     args.samples, desc=f'epoch {epoch}/{args.epochs}')
            except NonFiniteLoss as e:
                sys.exit(f'error: non-finite training loss ({e.args[0]}) at epoch {epoch}, batch {e.batch}; '
                         f'{last_path} keeps epoch {done}' + (f' (best val ELBO {best:.2f} at epoch {best_epoch})'
                                                              if best_state is not None else '')
                         + '; no model.pt was written')
            row = {'epoch': epoch, 'train_loss': train_loss, 'train_elbo_nats': train_elbo,
                   **evaluate(model, val_x)}
            row['seconds'] = time.time() - t0
            rows.append({k: (f'{v:.4f}' if isinstance(v, float) else v) for k, v in row.items()})
            improved = row['val_elbo_nats'] > best
            if improved:
                best, best_epoch = row['val_elbo_nats'], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            done = epoch
            write_metrics(rows, os.path.join(args.out_dir, 'metrics.csv'))
            save_last()
            print(f"epoch {epoch:3d}/{args.epochs}  train loss {row['train_loss']:10.3f}  "
                  f"val ELBO {row['val_elbo_nats']:9.2f} nats (recon {row['val_recon_nats']:9.2f}, "
                  f"KL {row['val_kl_nats']:6.2f})  {row['seconds']:5.1f} s{'  *' if improved else ''}", flush=True)

        if best_state is None:
            sys.exit('error: the validation ELBO was never finite; no checkpoint was written')
        model.load_state_dict(best_state)
        save_figures(model, test_x, args.out_dir, title)
        atomic_save({'format': vae.CKPT_FORMAT, 'args': {**vars(args), 'kl_weight': kl_weight, 'resume': False},
                     'state_dict': best_state, 'epoch': best_epoch, 'val_elbo_nats': best,
                     'torch': str(torch.__version__)}, ckpt_path)
        print(f'best val ELBO {best:.2f} nats at epoch {best_epoch}; wrote {ckpt_path}, metrics.csv, '
              f'reconstructions.png, samples.png (and last.pt, for --resume --epochs N to continue)')
    except KeyboardInterrupt:
        print(f'\ninterrupted after epoch {done} of {args.epochs}; {last_path} keeps it. Resume with:\n'
              f'  {command(args)}', file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
    train(parse_args())
