"""Compare the likelihoods fairly: evaluate each run's best checkpoint on the MNIST test set.

    python compare_likelihoods.py runs/compare/*-z32-s0 --data-dir ../shared/mnist

Per run, on the first --n-test test images (default all 10,000), in nats per image:
- ELBO, E_q[log p(x|z)] and KL (closed form), on the test set as this model sees it;
- log p(x) by importance sampling with the encoder as proposal (the IWAE bound, --k samples),
  its standard error over images, and the k-curve k = 1, 10, 100, 1000 on the first
  --n-curve images, from one set of 1000 draws split into disjoint groups of k;
- active units: latent dims whose posterior mean has variance > 0.01 across test images;
- 8-bit NLL and bits/dim, the common footing of every likelihood on gray values:
  categorical (256) and logistic are exact discrete probabilities; categorical with K < 256
  spreads each bin's mass uniformly over its 8-bit values; the densities (cbernoulli,
  gaussian, gaussian-fixed, beta) are scored on one uniformly dequantised test set,
  and -log p((255x + u)/256) + 784 log 256 is an upper bound on their discrete NLL.
  bernoulli models binarised digits: its NLL stands apart, never ranked with the others.
- for cbernoulli, the "Bernoulli on gray values" ELBO (binary cross-entropy on gray pixels,
  unnormalised) next to its proper ELBO on the same gray values;
- log Bayes factors: for each pair of 8-bit likelihoods with the same seed, the mean
  per-image difference of log p(x) with its standard error.
Writes into --out (default results/): likelihoods.csv, likelihoods_summary.csv,
bayes_factors.csv, likelihoods.png, samples.png, reconstructions.png.
"""
import argparse
import csv
import math
import os
import subprocess
import sys
import time

import torch
from torch.distributions import Bernoulli, Independent, Normal
from tqdm import tqdm

import train
import vae

LOG256 = math.log(256)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}  # two-sided 95% Student t quantiles
COLUMNS = ['dist', 'seed', 'latent_dim', 'epochs', 'best_epoch', 'train_seconds', 'test_data', 'n_test',
           'test_elbo_nats', 'test_recon_nats', 'test_kl_nats', 'iwae_nats', 'iwae_k', 'iwae_stderr',
           'nll_8bit_nats', 'bits_per_dim', 'bound_or_exact', 'active_units',
           'k_curve_n', 'iwae_k1_nats', 'iwae_k10_nats', 'iwae_k100_nats', 'iwae_k1000_nats',
           'cb_gray_elbo_nats', 'cb_gray_bce_elbo_nats', 'eval_seconds', 'torch', 'git_commit', 'device']
SUMMARY = ['test_elbo_nats', 'iwae_nats', 'nll_8bit_nats', 'bits_per_dim', 'active_units']
CURVE = (1, 10, 100, 1000)
CHUNK = 256   # decoder passes per call: small enough for a CPU's cache (faster than 2,000 here: README, Speed)

# -----------------------------------------------------------------------------
# estimators


@torch.inference_mode()
def log_weights(model, x, k, generator=None, chunk=CHUNK):
    """Importance weights log p(x, z_i) - log q(z_i|x) for k draws z_i ~ q(z|x): (k, B); also
    the k-sample mean of log p(x|z) (B,), the closed-form KL (B,) and the posterior means."""
    mu, logvar = model.encode(x)                          # (B, D)
    q = Normal(mu, (0.5 * logvar).exp())
    kc = max(1, min(k, chunk // x.shape[0]))              # draws per decoder call
    lw, log_px = [], 0.0
    for s in range(0, k, kc):
        z = vae.reparameterize(mu, logvar, min(kc, k - s), generator)   # (c, B, D)
        lpx = model.lik.log_prob(model.decode(z), x)                    # (c, B)
        lw.append(lpx + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1))
        log_px = log_px + lpx.sum(0)
    return torch.cat(lw), log_px / k, vae.kl_normal(mu, logvar), mu


def iwae(lw, k):
    """IWAE estimates of log p(x) from log weights (K, B), averaged over the K // k disjoint
    groups of k draws: (B,). Each is a lower bound on log p(x) in expectation, tighter as k grows."""
    groups = lw[: lw.shape[0] // k * k].view(-1, k, lw.shape[1])
    return (torch.logsumexp(groups, 1) - math.log(k)).mean(0)


def importance_log_px(model, x, k, generator=None):
    """log p(x) by importance sampling (IWAE, k draws) for every image of x, in batches: (n,);
    also the k-sample mean of log p(x|z), the closed-form KL (n,) and the posterior means (n, D)."""
    batches = x.split(max(1, CHUNK // min(k, CHUNK)))
    out = [log_weights(model, xb, k, generator) for xb in tqdm(batches, 'log p(x)', leave=False, disable=None)]
    lw, log_px, kl, mu = zip(*out)                        # lw: (k, b) per batch
    return iwae(torch.cat(lw, 1), k), torch.cat(log_px), torch.cat(kl), torch.cat(mu)


def footing(lik, x8):
    """How a model is scored on the 8-bit test images x8: the fixed data it is evaluated on,
    its name, the per-image log P(8-bit x) - log p(that data) (None for bernoulli), and what
    kind of number that gives. All densities share one dequantisation (the noise of beta's own
    evaluation data) and get -784 log 256, a bound by Jensen; categorical bins get
    -sum log(bin size); 8-bit levels are exact."""
    n = x8.shape[0]
    if isinstance(lik, vae.BernoulliLik):
        return vae.eval_data(lik, x8), 'binarised', None, 'binarised data: not comparable'
    if isinstance(lik, vae.CategoricalLik) and lik.bins != 256:
        size = torch.bincount(torch.arange(256) * lik.bins // 256, minlength=lik.bins).float()
        shift = -size.log()[(x8.long() * lik.bins // 256).flatten(1)].sum(1)
        return vae.eval_data(lik, x8), f'{lik.bins} bins', shift, 'exact (discrete)'
    if isinstance(lik, (vae.CategoricalLik, vae.LogisticLik)):
        return vae.eval_data(lik, x8), '8-bit levels', torch.zeros(n), 'exact (discrete)'
    return (vae.dequantize(x8, torch.Generator().manual_seed(vae.EVAL_SEED)), 'dequantised',
            torch.full((n,), -vae.N_PIXELS * LOG256), 'upper bound (dequantised)')


@torch.inference_mode()
def gray_bce_elbo(model, x8, batch=500):
    """For cbernoulli: ELBO on gray values x/255 with the proper Continuous Bernoulli density,
    and with the unnormalised "Bernoulli on gray values" (binary cross-entropy) in its place."""
    gen = torch.Generator(x8.device).manual_seed(vae.EVAL_SEED)
    proper = bce = 0.0
    for xb in x8.split(batch):
        x = xb.float() / 255
        log_px, kl, h = vae.elbo_terms(model, x, generator=gen)
        logits = vae.pixel(model.lik.head(h)[..., 0])
        log_bce = Independent(Bernoulli(logits=logits, validate_args=False), 3).log_prob(x).mean(0)
        proper += (log_px - kl).sum().item()
        bce += (log_bce - kl).sum().item()
    return proper / x8.shape[0], bce / x8.shape[0]


# -----------------------------------------------------------------------------
# one run


def evaluate_run(run_dir, test_x8, args, device):
    """Row of likelihoods.csv, the per-image 8-bit log p (or None) and the model."""
    t0 = time.time()
    model, ckpt = vae.load_checkpoint(os.path.join(run_dir, 'model.pt'), device)
    lik, a = model.lik, ckpt['args']
    x8 = test_x8[:args.n_test].cpu()
    x, data_name, shift, kind = footing(lik, x8)
    x = x.to(device)
    gen = torch.Generator(device).manual_seed(vae.EVAL_SEED)
    logp, log_px, kl, mu = importance_log_px(model, x, args.k, gen)   # (n,) each, mu (n, D)
    logp = logp.cpu()
    n = logp.shape[0]
    curve_x = x[:args.n_curve]
    curve_lw = torch.cat([log_weights(model, xb, max(CURVE), gen)[0]
                          for xb in curve_x.split(max(1, CHUNK // max(CURVE)))], 1)
    row = {'dist': a['dist'] + (f"-K{a['bins']}" if a['dist'] == 'categorical' and a['bins'] != 256 else ''),
           'seed': a['seed'], 'latent_dim': a['latent_dim'],
           'epochs': a['epochs'], 'best_epoch': ckpt['epoch'], 'train_seconds': read_train_seconds(run_dir),
           'test_data': data_name, 'n_test': n,
           'test_elbo_nats': (log_px - kl).mean().item(), 'test_recon_nats': log_px.mean().item(),
           'test_kl_nats': kl.mean().item(), 'iwae_nats': logp.mean().item(), 'iwae_k': args.k,
           'iwae_stderr': (logp.std() / math.sqrt(n)).item(), 'bound_or_exact': kind,
           'active_units': int((mu.var(0) > 0.01).sum()), 'k_curve_n': curve_x.shape[0],
           **{f'iwae_k{k}_nats': iwae(curve_lw, k).mean().item() for k in CURVE}}
    logp8 = None
    if shift is not None:
        logp8 = logp + shift
        row['nll_8bit_nats'] = -logp8.mean().item()
        row['bits_per_dim'] = row['nll_8bit_nats'] / (vae.N_PIXELS * math.log(2))
    if isinstance(lik, vae.ContinuousBernoulliLik):
        row['cb_gray_elbo_nats'], row['cb_gray_bce_elbo_nats'] = gray_bce_elbo(model, x8.to(device))
    row['eval_seconds'] = time.time() - t0
    return row, logp8, model


def read_train_seconds(run_dir):
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return sum(float(r['seconds']) for r in csv.DictReader(f))


# -----------------------------------------------------------------------------
# tables and figures


def mean_ci(values):
    """Mean and 95% Student-t interval over seeds (None, None for one value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None, None
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    t = T95[max(d for d in T95 if d <= n - 1)] if n - 1 <= 30 else 1.96
    return m, m - t * sd / math.sqrt(n), m + t * sd / math.sqrt(n)


def summarise(rows):
    out = []
    for dist in dict.fromkeys(r['dist'] for r in rows):
        rs = [r for r in rows if r['dist'] == dist]
        s = {'dist': dist, 'n_seeds': len(rs), 'bound_or_exact': rs[0]['bound_or_exact']}
        for key in SUMMARY:
            vals = [r[key] for r in rs if r.get(key) is not None]
            s[f'{key}_mean'], s[f'{key}_ci95_lo'], s[f'{key}_ci95_hi'] = mean_ci(vals) if vals else (None,) * 3
        out.append(s)
    return out


def bayes_factors(rows, logp8):
    """Mean per-image log p_a(x) - log p_b(x) with its standard error, for pairs on one seed."""
    out = []
    idx = [i for i, r in enumerate(rows) if logp8[i] is not None]
    for i in idx:
        for j in idx:
            if i < j and rows[i]['seed'] == rows[j]['seed']:
                d = logp8[i] - logp8[j]
                out.append({'seed': rows[i]['seed'], 'a': rows[i]['dist'], 'b': rows[j]['dist'],
                            'mean_log_bf_nats': d.mean().item(),
                            'stderr_nats': (d.std() / math.sqrt(d.numel())).item(),
                            'a_better_on_images': (d > 0).float().mean().item()})
    return out


def write_csv(rows, path, columns):
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: ('' if r.get(c) is None else (f'{r[c]:.6g}' if isinstance(r[c], float) else r[c]))
                        for c in columns})
    os.replace(tmp, path)


def plot_results(rows, summary, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    eight = sorted((s for s in summary if s['bits_per_dim_mean'] is not None), key=lambda s: s['bits_per_dim_mean'])
    binar = [s for s in summary if s['bits_per_dim_mean'] is None]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={'width_ratios': [4, 1]})
    for i, s in enumerate(eight):
        rs = [r for r in rows if r['dist'] == s['dist']]
        if s['n_seeds'] > 1:   # 95% interval over seeds
            lo, hi = s['bits_per_dim_ci95_lo'], s['bits_per_dim_ci95_hi']
        else:                  # 95% interval over test images
            half = 1.96 * rs[0]['iwae_stderr'] / (vae.N_PIXELS * math.log(2))
            lo, hi = s['bits_per_dim_mean'] - half, s['bits_per_dim_mean'] + half
        bound = s['bound_or_exact'].startswith('upper')
        ax.errorbar([i], [s['bits_per_dim_mean']], yerr=[[s['bits_per_dim_mean'] - lo], [hi - s['bits_per_dim_mean']]],
                    fmt='v' if bound else 'o', color='C1' if bound else 'C0', capsize=4, ms=8)
        ax.plot([i] * len(rs), [r['bits_per_dim'] for r in rs], '.', color='gray')
    ax.set_xticks(range(len(eight)), [s['dist'] for s in eight])
    ax.set_ylabel('bits/dim on the 8-bit test pixels (lower is better)')
    ax.plot([], [], 'o', color='C0', label='exact discrete likelihood')
    ax.plot([], [], 'v', color='C1', label='density: upper bound via uniform dequantisation')
    ax.legend(fontsize=9)
    ax.set_title(f'8-bit MNIST test set, IWAE k = {rows[0]["iwae_k"]}, n = {rows[0]["n_test"]}', fontsize=10)
    ax.grid(axis='y', alpha=0.3)
    for i, s in enumerate(binar):
        rs = [r for r in rows if r['dist'] == s['dist']]
        half = ((s['iwae_nats_ci95_hi'] - s['iwae_nats_ci95_lo']) / 2 if s['n_seeds'] > 1
                else 1.96 * rs[0]['iwae_stderr'])
        bx.errorbar([i], [-s['iwae_nats_mean']], yerr=half, fmt='s', color='C2', capsize=4, ms=8)
        bx.plot([i] * len(rs), [-r['iwae_nats'] for r in rs], '.', color='gray')
    bx.set_xticks(range(len(binar)), [s['dist'] for s in binar])
    bx.set_xlim(-1, max(1, len(binar)))
    bx.set_ylabel('NLL (nats per image)')
    bx.set_title('binarised test set\n(a different data set)', fontsize=10)
    bx.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    train.save_png(fig, path)


@torch.inference_mode()
def plot_rows(models, test_x8, out_dir):
    """samples.png and reconstructions.png: one row per likelihood, decoder means next to
    true samples of p(x|z) (prior draws z ~ N(0, I); reconstructions at z = mu(x))."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    for name, recon in [('samples.png', False), ('reconstructions.png', True)]:
        n = len(models) + recon
        fig, axes = plt.subplots(n, 2, figsize=(10, 0.75 * n + 0.6), squeeze=False)
        if recon:
            axes[0, 0].imshow(train.grid(test_x8[:8].float() / 255, 8), cmap='gray', vmin=0, vmax=1)
            axes[0, 0].set_ylabel('test digits', rotation=0, ha='right', va='center', fontsize=9)
        for i, (dist, model) in enumerate(models.items(), int(recon)):
            torch.manual_seed(vae.EVAL_SEED)
            dev = next(model.parameters()).device
            if recon:
                x = vae.eval_data(model.lik, test_x8[:8]).to(dev)
                z = model.encode(x)[0]
            else:
                z = torch.randn(8, model.latent_dim, generator=torch.Generator().manual_seed(vae.EVAL_SEED)).to(dev)
            h = model.decode(z)
            axes[i, 0].imshow(train.grid(model.lik.mean(h), 8), cmap='gray', vmin=0, vmax=1)
            axes[i, 1].imshow(train.grid(model.lik.sample(h), 8), cmap='gray', vmin=0, vmax=1)
            axes[i, 0].set_ylabel(dist, rotation=0, ha='right', va='center', fontsize=9)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
        axes[0, 0].set_title('decoder mean', fontsize=10)
        axes[0, 1].set_title('sample of p(x|z) (clipped to [0, 1])', fontsize=10)
        fig.suptitle('reconstructions at z = mu(x)' if recon else 'prior samples z ~ N(0, I)', fontsize=11)
        fig.tight_layout()
        train.save_png(fig, os.path.join(out_dir, name))


def print_tables(rows, bfs):
    eight = sorted((r for r in rows if r.get('bits_per_dim') is not None), key=lambda r: r['bits_per_dim'])
    r0 = rows[0]
    print(f"\n8-bit test pixels: IWAE k = {r0['iwae_k']} on {r0['n_test']} images (bits/dim, lower is better;"
          f" '<=' marks an upper bound from uniform dequantisation)")
    print(f"{'dist':16s} {'seed':>4s} {'bits/dim':>10s} {'NLL nats':>10s} {'+-se':>6s} {'ELBO':>10s} "
          f"{'KL':>7s} {'AU':>3s} {'k=1':>9s} {'k=10':>9s} {'k=100':>9s} {'k=1000':>9s} {'eval s':>7s}")
    for r in eight:
        le = '<=' if r['bound_or_exact'].startswith('upper') else '  '
        print(f"{r['dist']:16s} {r['seed']:4d} {le}{r['bits_per_dim']:8.4f} {r['nll_8bit_nats']:10.2f} "
              f"{r['iwae_stderr']:6.2f} {r['test_elbo_nats']:10.2f} {r['test_kl_nats']:7.2f} {r['active_units']:3d} "
              + ' '.join(f"{r[f'iwae_k{k}_nats']:9.2f}" for k in CURVE) + f" {r['eval_seconds']:7.0f}")
    print('  (ELBO and the k-curve are log-densities of the data each model is scored on; the k-curve'
          f" uses the first {r0['k_curve_n']} images)")
    for r in rows:
        if r.get('bits_per_dim') is None:
            print(f"\nbinarised test set ({r['dist']}, seed {r['seed']}; a different data set, not ranked): "
                  f"NLL {-r['iwae_nats']:.2f} +- {r['iwae_stderr']:.2f} nats, ELBO {r['test_elbo_nats']:.2f}, "
                  f"k-curve " + ', '.join(f"{-r[f'iwae_k{k}_nats']:.2f}" for k in CURVE))
        if r.get('cb_gray_elbo_nats') is not None:
            print(f"\ncbernoulli (seed {r['seed']}) on gray values: ELBO {r['cb_gray_elbo_nats']:.2f} nats with the "
                  f"normalised density; {r['cb_gray_bce_elbo_nats']:.2f} with 'Bernoulli on gray values' "
                  f"(unnormalised: not a log-probability; the missing normaliser is "
                  f"{r['cb_gray_elbo_nats'] - r['cb_gray_bce_elbo_nats']:.2f} nats)")
    if bfs:
        print('\nlog Bayes factors per image, log p_a(x) - log p_b(x) on the 8-bit pixels (nats, +- standard error):')
        for b in sorted(bfs, key=lambda b: -abs(b['mean_log_bf_nats'])):
            print(f"  seed {b['seed']}: {b['a']:>16s} vs {b['b']:16s} {b['mean_log_bf_nats']:10.2f} +- "
                  f"{b['stderr_nats']:.2f}  (a better on {100 * b['a_better_on_images']:.0f}% of images)")


# -----------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = train.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', help='run directories holding model.pt and metrics.csv')
    p.add_argument('--data-dir', default='data')
    p.add_argument('--out', default='results')
    p.add_argument('--k', type=train.number(int, 1), default=100, help='importance samples per image')
    p.add_argument('--n-test', type=train.number(int, 1, 10000), default=10000)
    p.add_argument('--n-curve', type=train.number(int, 1, 10000), default=1000,
                   help='images for the k-curve (k = 1, 10, 100, 1000)')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda', 'mps'])
    return p.parse_args(argv)


def git_commit():
    try:
        return subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    device = train.pick_device(args.device)
    for run in args.runs:
        if not os.path.isfile(os.path.join(run, 'model.pt')):
            sys.exit(f'error: {run} has no model.pt (train it first: make compare trains every run)')
    try:
        test_x8 = vae.load_mnist(args.data_dir)['test'][0]
    except vae.DataError as e:
        sys.exit(f'error: {e}')
    os.makedirs(args.out, exist_ok=True)
    info = {'torch': str(torch.__version__), 'git_commit': git_commit(),
            'device': f'{device} ({torch.get_num_threads()} threads)' if device.type == 'cpu' else
            f'{device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else device.type})'}
    rows, logp8, models = [], [], {}
    for run in args.runs:
        try:
            row, lp8, model = evaluate_run(run, test_x8, args, device)
        except ValueError as e:
            sys.exit(f'error: {e}')
        rows.append({**row, **info})
        logp8.append(lp8)
        models.setdefault(row['dist'], model)
        print(f"{run}: {row['dist']} seed {row['seed']}: IWAE(k={args.k}) {row['iwae_nats']:.2f} nats"
              + (f", {row['bits_per_dim']:.4f} bits/dim ({row['bound_or_exact']})" if 'bits_per_dim' in row else '')
              + f"; evaluated in {row['eval_seconds']:.0f} s", flush=True)
    summary = summarise(rows)
    bfs = bayes_factors(rows, logp8)
    write_csv(rows, os.path.join(args.out, 'likelihoods.csv'), COLUMNS)
    write_csv(summary, os.path.join(args.out, 'likelihoods_summary.csv'),
              ['dist', 'n_seeds', 'bound_or_exact'] + [f'{k}_{s}' for k in SUMMARY for s in ('mean', 'ci95_lo', 'ci95_hi')])
    write_csv(bfs, os.path.join(args.out, 'bayes_factors.csv'),
              ['seed', 'a', 'b', 'mean_log_bf_nats', 'stderr_nats', 'a_better_on_images'])
    plot_results(rows, summary, os.path.join(args.out, 'likelihoods.png'))
    plot_rows(models, test_x8, args.out)
    print_tables(rows, bfs)
    print(f'\nwrote {args.out}/likelihoods.csv, likelihoods_summary.csv, bayes_factors.csv, likelihoods.png, '
          f'samples.png, reconstructions.png; evaluation took {time.time() - t0:.0f} s')


if __name__ == '__main__':
    main()
