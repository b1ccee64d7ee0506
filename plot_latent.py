"""See the latent space: where the encoder puts test digits, and what the decoder draws there.

    python plot_latent.py --ckpt runs/bernoulli-z2-s0/model.pt [--n 1000] [--out results/]
    python plot_latent.py --ckpt runs/*-z2-s0/model.pt --all results/latent_all.png

Per checkpoint, into --out:
- latent_<name>.png: the encoder means mu(x) of the first --n test images (as the model sees
  them: binarised, dequantised, ... with the fixed evaluation noise), one point each, coloured by
  digit. The title names the likelihood and the model's test NLL: IWAE with --k draws on the first
  --n-nll test images, scored as compare_likelihoods.py scores it (nats per image on binarised
  digits for bernoulli; the exact nats and bits/dim of the 8-bit pixels otherwise).
- manifold_<name>.png: a --grid x --grid grid of decoder means, at z = (q_j, q_i), where q are
  the quantiles (i + 1/2) / grid of the N(0, 1) prior (Kingma & Welling, Fig. 4); z1 grows to the
  right, z2 upwards.
<name> is the likelihood, with -K<bins>, -z<latent dim>, -s<seed> added when not 256, 2 and 0.

A model whose latent dim is not 2 is shown in the plane of the first two principal components
of its means: the scatter plots the projections onto them, and the manifold places the prior's
quantiles along those two directions and 0 along all others. The titles say so.

With --all FILE: one figure instead, a panel per checkpoint on the same test images, each titled
with the leave-one-out accuracy of a k-nearest-neighbour classifier (k = 5) on its 2-D points.
"""
import utils
if __name__ == '__main__':
    utils.one_line_errors()   # first: from here on Ctrl-C, a full disk or OOM is one line, not a traceback

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
from typing import NamedTuple  # noqa: E402

import torch  # noqa: E402
from torch.distributions import Normal  # noqa: E402

import rundir  # noqa: E402
import vae  # noqa: E402
from utils import number  # noqa: E402

KNN_K = 5

# -----------------------------------------------------------------------------
# the numbers behind the figures


def knn_accuracy(points, labels, k=KNN_K):
    """Leave-one-out accuracy of a k-nearest-neighbour majority vote (Euclidean) on points
    (n, d) with integer labels (n,). Ties go to the class of the nearer neighbours."""
    d = torch.cdist(points.double(), points.double())      # (n, n)
    d.fill_diagonal_(math.inf)                               # leave each point out of its own vote
    nearest = d.topk(k, largest=False).indices               # (n, k), nearest first
    weight = 1 + 1e-3 * torch.linspace(1, 0, k, dtype=torch.float64)   # < 1 vote in all: breaks ties only
    votes = torch.zeros(len(labels), int(labels.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, labels[nearest], weight.expand(len(labels), k))
    return (votes.argmax(1) == labels).double().mean().item()


def prior_quantiles(n):
    """n evenly spaced quantiles of N(0, 1), at probabilities (i + 1/2) / n: (n,)."""
    return Normal(0.0, 1.0).icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n).float()


def plane(mu):
    """The 2-D plane the figures use: (D, 2) orthonormal basis and a description. The latent
    axes themselves when D = 2; else the first two principal directions of the means mu (n, D),
    with the sign chosen so that each direction's largest loading is positive."""
    if mu.shape[1] == 2:
        return torch.eye(2), None
    _, s, vh = torch.linalg.svd(mu - mu.mean(0), full_matrices=False)
    basis = vh[:2].T                                         # (D, 2)
    sign = basis.gather(0, basis.abs().argmax(0, keepdim=True)).sign()
    explained = (s[:2] ** 2).sum() / (s ** 2).sum()
    return basis * sign, (f'latent dim {mu.shape[1]}: first two principal components of mu(x) '
                          f'({100 * explained:.0f}% of its variance)')


class View(NamedTuple):
    """What the figures show of the means mu (n, D): points (n, 2); the basis (D, k) of the
    manifold's k directions; the two axes' names (short), as the scatter labels them and as the
    manifold does; the points the kNN vote uses; what the side-by-side panel adds to its title;
    a note on the view (None for D = 2)."""
    points: torch.Tensor
    basis: torch.Tensor
    names: tuple
    scatter_axes: tuple
    manifold_axes: tuple
    knn_points: torch.Tensor
    where: str = ''
    note: str = None


def coordinates(mu, labels):
    """The View of the means mu (n, D): D = 2, the latent axes; D > 2, the first two principal
    components (plane); D = 1, mu against the digit, jittered, so that the classes stand apart."""
    if mu.shape[1] == 1:
        jitter = torch.rand(len(labels), generator=torch.Generator().manual_seed(vae.EVAL_SEED)) - 0.5
        points = torch.stack([mu[:, 0], labels.float() + 0.6 * jitter], 1)
        names = ('z1', 'digit (jittered)')
        return View(points, torch.ones(1, 1), names, ('z1 = mu_1(x)', names[1]), names, mu[:, :1],
                    ' (1-D: mu vs digit)', 'latent dim 1: mu(x) against the digit, jittered vertically')
    basis, note = plane(mu)
    if note is None:
        return View(mu @ basis, basis, ('z1', 'z2'), ('z1 = mu_1(x)', 'z2 = mu_2(x)'), ('z1', 'z2'), mu @ basis)
    return View(mu @ basis, basis, ('PC 1', 'PC 2'), ('PC 1 of mu(x)', 'PC 2 of mu(x)'),
                ('PC 1 direction', 'PC 2 direction'), mu @ basis, ' (first two PCs)', note)


def manifold_latents(n, basis):
    """The grid's latent points (n*n, D), row-major as drawn: row i (from the top) has
    z2 = q[n-1-i], column j has z1 = q[j], along the plane's two basis directions."""
    q = prior_quantiles(n)
    z1 = q.repeat(n)                                         # column j
    z2 = q.flip(0).repeat_interleave(n)                      # row i
    return torch.stack([z1, z2], 1) @ basis.T


def run_name(lik, a):
    return (rundir.model_name(a, lik) + (f"-z{a['latent_dim']}" if a['latent_dim'] != 2 else '')
            + (f"-s{a['seed']}" if a['seed'] != 0 else ''))


def nll_line(model, x8, k):
    """Importance-sampled test NLL as compare_likelihoods.py computes it, as a title line: the
    exact log P of the 8-bit pixels, or of the likelihood's own data where it has no 8-bit score."""
    dev = next(model.parameters()).device
    x8 = x8.to(dev)
    est = vae.importance_log_px(model, vae.eval_data(model.lik, x8), k,
                                torch.Generator(dev).manual_seed(vae.EVAL_SEED), x8)
    where = f'IWAE k = {k}, {len(x8)} test images'
    if est.exact8 is None:
        nll = -est.data.cpu()
        return (f'test NLL {nll.mean():.2f} ± {nll.std() / math.sqrt(len(nll)):.2f} (s.e.) nats '
                f'({model.lik.data_name} digits, {where})')
    nll = -est.exact8.cpu()
    bpd = nll.mean() / (vae.N_PIXELS * math.log(2))
    return (f'test NLL {nll.mean():.1f} ± {nll.std() / math.sqrt(len(nll)):.1f} (s.e.) nats = {bpd:.3f} bits/dim '
            f'(exact, 8-bit pixels, {where})')


# -----------------------------------------------------------------------------
# figures


def scatter(ax, points, labels, title):
    """One scatter per digit, so the legend names them; coordinates exactly `points`."""
    plt = utils.pyplot()
    cmap = plt.get_cmap('tab10')
    for digit in range(10):
        p = points[labels == digit]
        ax.scatter(p[:, 0], p[:, 1], s=6, color=cmap(digit), label=str(digit), alpha=0.8, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_aspect('equal', adjustable='datalim')
    ax.grid(alpha=0.3)


def latent_figure(points, labels, title, axes):
    plt = utils.pyplot()
    fig, ax = plt.subplots(figsize=(7, 6.4))
    scatter(ax, points, labels, title)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.legend(title='digit', markerscale=3, fontsize=8, loc='center left', bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


@torch.inference_mode()
def manifold_figure(model, basis, n, title, axes):
    """n x n decoder means over the prior's quantiles along the two basis directions, or one
    row of n along a single direction (a 1-D latent)."""
    plt = utils.pyplot()
    dev = next(model.parameters()).device
    q = prior_quantiles(n)
    rows = n if basis.shape[1] == 2 else 1
    z = (manifold_latents(n, basis) if rows > 1 else q[:, None] @ basis.T).to(dev)   # (rows*n, D)
    imgs = torch.cat([model.lik.mean(model.decode(zb)) for zb in z.split(100)]).cpu()   # (rows*n, 1, 28, 28)
    canvas = imgs.view(rows, n, 28, 28).permute(0, 2, 1, 3).reshape(rows * 28, n * 28)
    fig, ax = plt.subplots(figsize=(7.5, 8 if rows > 1 else 2.2))
    ax.imshow(canvas.clamp(0, 1).numpy(), cmap='gray', vmin=0, vmax=1)
    ticks = list(range(0, n, max(1, n // 5))) + [n - 1]
    ax.set_xticks([28 * j + 13.5 for j in ticks], [f'{q[j]:.2f}' for j in ticks])
    ax.set_xlabel(axes[0], fontsize=9)
    if rows > 1:
        ax.set_yticks([28 * i + 13.5 for i in ticks], [f'{q[n - 1 - i]:.2f}' for i in ticks])
        ax.set_ylabel(axes[1], fontsize=9)
    else:
        ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def all_figure(panels, labels, n):
    """Every model's latent means of the same test digits, side by side, with kNN accuracy."""
    plt = utils.pyplot()
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows + 0.6), squeeze=False)
    for ax, (name, view) in zip(axes.flat, panels):
        acc = knn_accuracy(view.knn_points, labels)
        print(f'{name}: {KNN_K}-NN leave-one-out accuracy {acc:.3f}{view.where}')
        scatter(ax, view.points, labels, f'{name}{view.where}\n{KNN_K}-NN accuracy {100 * acc:.1f}% (leave-one-out)')
        ax.set_xlabel(view.names[0], fontsize=8)
        ax.set_ylabel(view.names[1], fontsize=8)
    for ax in axes.flat[len(panels):]:
        ax.axis('off')
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, title='digit', markerscale=3, loc='center right', fontsize=8)
    fig.suptitle(f'encoder means mu(x) of the first {n} MNIST test digits, one model per panel', fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.94, 1))
    return fig


def save(fig, path):
    utils.save_png(fig, path)
    print(f'wrote {path}')


# -----------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = utils.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', nargs='+', required=True, help="model.pt files (or run directories holding one)")
    p.add_argument('--n', type=number(int, 10, 10000), default=1000, help='test images in the scatter')
    p.add_argument('--out', default='results', help='directory for latent_<name>.png and manifold_<name>.png')
    p.add_argument('--all', metavar='FILE', help='draw one side-by-side figure of every --ckpt into FILE instead')
    p.add_argument('--grid', type=number(int, 2, 50), default=20, help='manifold grid size')
    p.add_argument('--k', type=number(int, 1, 100000), default=100, help='importance samples for the test NLL')
    p.add_argument('--n-nll', type=number(int, 0, 10000), default=10000,
                   help='test images for the NLL in the title (0: skip it)')
    p.add_argument('--data-dir', default='data')
    p.add_argument('--device', default='auto', choices=utils.DEVICES)
    return p.parse_args(argv)


def main(argv=None):
    """Returns {path: figure} of what it wrote."""
    args = parse_args(argv)
    device = utils.pick_device(args.device)
    models = []
    for path in args.ckpt:
        path = os.path.join(path, 'model.pt') if os.path.isdir(path) else path
        models.append(utils.or_exit(vae.load_checkpoint, path, device))
    x8, labels = utils.or_exit(utils.load_mnist, args.data_dir, errors=utils.DataError)['test']
    labels = labels[:args.n]
    if args.all:      # checked (and made) only once the inputs are known to be good
        utils.writable_dir(os.path.dirname(args.all) or '.', '--all', [os.path.basename(args.all)])
    else:
        utils.writable_dir(args.out, '--out')

    figures, panels = {}, []
    for model, ckpt in models:
        a, name = ckpt['args'], run_name(model.lik, ckpt['args'])
        with torch.inference_mode():
            mu = model.encode(vae.eval_data(model.lik, x8[:args.n]).to(device))[0].cpu()   # (n, D)
        view = coordinates(mu, labels)                                                    # points (n, 2)
        if view.note:
            print(f'{name}: {view.note}')
        if args.all:
            panels.append((name, view))
            continue
        title = f"{a['dist']} likelihood, latent dim {a['latent_dim']}, epochs {a['epochs']} (best at {ckpt['epoch']})"
        if args.n_nll:
            print(f'{name}: test NLL by importance sampling, k = {args.k} on {args.n_nll} images ...', flush=True)
            line = nll_line(model, x8[:args.n_nll], args.k)
            print(f'{name}: {line}')
            title += '\n' + line
        scatter_title = f'{title}\nencoder means mu(x) of the first {args.n} test digits'
        shape = f'{args.grid} x {args.grid} grid' if view.basis.shape[1] == 2 else f'row of {args.grid}'
        manifold_title = f'{title}\ndecoder means on a {shape} of N(0, 1) prior quantiles'
        if view.note:
            scatter_title += f'\n{view.note}'
        if mu.shape[1] > 2:
            manifold_title += '\nalong the first two principal directions of mu(x), 0 along the others'
        figures[os.path.join(args.out, f'latent_{name}.png')] = latent_figure(view.points, labels, scatter_title,
                                                                              view.scatter_axes)
        figures[os.path.join(args.out, f'manifold_{name}.png')] = manifold_figure(
            model, view.basis, args.grid, manifold_title, view.manifold_axes)
    if args.all:
        figures[args.all] = all_figure(panels, labels, args.n)
    for path, fig in figures.items():
        save(fig, path)
    return figures


if __name__ == '__main__':
    main()
