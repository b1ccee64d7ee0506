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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = p.parse_args(argv)
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


def write_metrics(rows, path):
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=METRICS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


@torch.inference_mode()
def evaluate(model, x, batch_size=1000):
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
    fig.savefig(os.path.join(out_dir, 'reconstructions.png'), dpi=100, bbox_inches='tight')
    plt.close(fig)

    z = torch.randn(64, model.latent_dim, generator=gen, device=test_x.device)
    h = model.decode(z)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, (name, imgs) in zip(axes, [('decoder mean', lik.mean(h)), ('sample of p(x|z)', lik.sample(h))]):
        ax.imshow(grid(imgs, 8), cmap='gray', vmin=0, vmax=1)
        ax.set_title(name + ' (clipped to [0, 1])' * isinstance(lik, (vae.GaussianLik, vae.FixedGaussianLik)))
        ax.axis('off')
    fig.suptitle(f'{title}: 64 prior samples z ~ N(0, I)')
    fig.savefig(os.path.join(out_dir, 'samples.png'), dpi=100, bbox_inches='tight')
    plt.close(fig)


# -----------------------------------------------------------------------------
# training


def train(args):
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    try:
        data = vae.load_mnist(args.data_dir)
    except vae.DataError as e:
        sys.exit(f'error: {e}')
    os.makedirs(args.out_dir, exist_ok=True)
    model = vae.build(vars(args)).to(device)
    lik = model.lik
    if args.kl_weight is None:
        args.kl_weight = lik.default_kl_weight
    train_x8 = data['train'][0][:args.subset].to(device)     # (N, 1, 28, 28) uint8
    val_x = vae.eval_data(lik, data['val'][0]).to(device)   # fixed binarisation/noise
    test_x = vae.eval_data(lik, data['test'][0])[:16].to(device)  # as the whole test set is fixed
    gen = torch.Generator(device).manual_seed(args.seed)    # shuffling and data noise
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ckpt_path = os.path.join(args.out_dir, 'model.pt')
    title = f'{args.dist}, latent dim {args.latent_dim}'
    n, rows, best, best_epoch, best_state = train_x8.shape[0], [], -math.inf, None, None
    n_batches = math.ceil(n / args.batch_size)
    print(f'training {args.dist} (latent dim {args.latent_dim}) on {n} images, {device}, '
          f'{sum(p.numel() for p in model.parameters()):,} parameters -> {args.out_dir}', flush=True)

    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        model.train()
        loss_sum = elbo_sum = 0.0
        batches = torch.randperm(n, generator=gen, device=device).split(args.batch_size)
        bar = tqdm(batches, desc=f'epoch {epoch}/{args.epochs}', leave=False, disable=None, mininterval=1)
        for i, idx in enumerate(bar, 1):
            x = lik.data(train_x8[idx], gen)                    # (B, 1, 28, 28) in [0, 1]
            log_px, kl, h = vae.elbo_terms(model, x, args.samples)
            loss = lik.loss(h, x, log_px, kl, args.kl_weight).mean()
            if not torch.isfinite(loss):
                kept = (f'best checkpoint (epoch {best_epoch}) kept in {ckpt_path}'
                        if best_state is not None else 'no checkpoint was written')
                if best_state is not None:
                    model.load_state_dict(best_state)
                    save_figures(model, test_x, args.out_dir, title)
                sys.exit(f'error: non-finite training loss ({loss.item()}) at epoch {epoch}, '
                         f'batch {i}/{n_batches}; {kept}')
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            elbo_sum += (log_px - kl).sum().item()
            bar.set_postfix(loss=f'{loss.item():.2f}', refresh=False)

        row = {'epoch': epoch, 'train_loss': loss_sum / n, 'train_elbo_nats': elbo_sum / n,
               **evaluate(model, val_x)}
        row['seconds'] = time.time() - t0
        rows.append(row)
        improved = row['val_elbo_nats'] > best
        if improved:
            best, best_epoch = row['val_elbo_nats'], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            atomic_save({'format': vae.CKPT_FORMAT, 'args': vars(args), 'state_dict': best_state,
                         'epoch': epoch, 'val_elbo_nats': best, 'torch': str(torch.__version__)}, ckpt_path)
        write_metrics([{k: (f'{v:.4f}' if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                      os.path.join(args.out_dir, 'metrics.csv'))
        print(f"epoch {epoch:3d}/{args.epochs}  train loss {row['train_loss']:10.3f}  "
              f"val ELBO {row['val_elbo_nats']:9.2f} nats (recon {row['val_recon_nats']:9.2f}, "
              f"KL {row['val_kl_nats']:6.2f})  {row['seconds']:5.1f} s{'  *' if improved else ''}", flush=True)

    if best_state is None:
        sys.exit('error: the validation ELBO was never finite; no checkpoint was written')
    model.load_state_dict(best_state)
    save_figures(model, test_x, args.out_dir, title)
    print(f'best val ELBO {best:.2f} nats at epoch {best_epoch}; wrote {ckpt_path}, metrics.csv, '
          f'reconstructions.png, samples.png')


if __name__ == '__main__':
    train(parse_args())
