"""Compare the likelihoods fairly: evaluate each run's best checkpoint on the MNIST test set.

    python compare_likelihoods.py runs/compare/*-z32-s0 --data-dir ../shared/mnist

Per run, on the first --n-test test images (default all 10,000), in nats per image:
- ELBO, E_q[log p(x|z)] and KL (closed form), on the test set as this model sees it
  (binarised, gray values, dequantised, levels or bins: the likelihood's data);
- the exact log-probability of the 8-bit test pixels, log P(x), by importance sampling
  with the encoder as proposal (the IWAE bound, --k samples), its standard error over
  images, and the k-curve k = 1, 10, 100, 1000 on the first --n-curve images, from one set of
  1000 draws split into disjoint groups of k. Every likelihood but bernoulli defines P(x):
  categorical (256) and logistic are distributions over the levels; categorical with K < 256
  spreads each bin's mass uniformly over its 8-bit values; a density (cbernoulli, gaussian,
  gaussian-shared, gaussian-fixed, beta), whatever it was trained on (--fit), gives each 8-bit
  value v the integral of p(x|z) over its bin [v/256, (v+1)/256), the mass outside [0, 1]
  going to the end bins;
  8-bit NLL and bits/dim = NLL / (784 ln 2) are the ranking;
- for the densities, the dequantisation bound -log p((v + u)/256) + 784 log 256 (one fixed
  uniform u) beside it, from the same draws: an upper bound on their NLL, shown, never ranked;
- bernoulli models binarised digits, another data set: its NLL stands apart, never ranked;
- active units: latent dims whose posterior mean has variance > 0.01 across test images;
- each likelihood's own diagnostics (cbernoulli: the "Bernoulli on gray values" ELBO,
  binary cross-entropy on gray pixels, unnormalised, next to its proper ELBO);
- log Bayes factors: for each pair of 8-bit likelihoods with the same seed, the mean
  per-image difference of log P(x) with its standard error;
- sample quality, judged by the digit classifier trained here (quality.py, --classifier): the
  Fréchet distance of --n-samples prior samples to the test images in its feature space, its
  inception score and label entropy, for the decoder means and for samples of p(x|z), and its
  accuracy on the reconstructions (quality.QUALITY_COLUMNS).
Also, from each run's metrics.csv, the learning curves: per epoch the validation negative ELBO
of the 8-bit pixels in bits/dim (nats per binarised image for bernoulli), the scored epoch marked.
Writes into --out (default results/): likelihoods.csv, likelihoods_summary.csv,
bayes_factors.csv, likelihoods.png, quality.png, samples.png, reconstructions.png, learning_curves.png.
"""
import utils
if __name__ == '__main__':
    utils.one_line_errors()   # first: from here on Ctrl-C, a full disk or OOM is one line, not a traceback

import argparse  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import quality  # noqa: E402
import rundir  # noqa: E402
import vae  # noqa: E402
from utils import number  # noqa: E402

COLUMNS = ['dist', 'seed', 'latent_dim', 'epochs', 'best_epoch', 'train_seconds', 'test_data', 'scored_on', 'n_test',
           'test_elbo_nats', 'test_recon_nats', 'test_kl_nats', 'iwae_nats', 'iwae_k', 'iwae_stderr',
           'nll_8bit_nats', 'bits_per_dim', 'bound_nll_8bit_nats', 'bound_bits_per_dim', 'active_units',
           'k_curve_n', 'iwae_k1_nats', 'iwae_k10_nats', 'iwae_k100_nats', 'iwae_k1000_nats',
           'quality_n', *quality.QUALITY_COLUMNS]
TAIL = ['eval_seconds', 'quality_seconds', 'classifier_test_accuracy', 'torch', 'git_commit', 'device']
SUMMARY = ['test_elbo_nats', 'iwae_nats', 'iwae_stderr', 'nll_8bit_nats', 'bits_per_dim', 'bound_bits_per_dim', 'active_units',
           *quality.QUALITY_COLUMNS]
CURVE = (1, 10, 100, 1000)
OUTPUTS = ('likelihoods.csv', 'likelihoods_summary.csv', 'bayes_factors.csv', 'likelihoods.png', 'quality.png',
           'samples.png', 'reconstructions.png', 'learning_curves.png')


def columns():
    """likelihoods.csv's columns: COLUMNS, every registered likelihood's diagnostics, TAIL."""
    extra = [c for lik in vae.LIKELIHOODS.values() for c in lik.diagnostic_columns]
    return COLUMNS + list(dict.fromkeys(extra)) + TAIL

# -----------------------------------------------------------------------------
# one run


def check_runs(runs, device):
    """Every run checked before any is evaluated: [(run, model, ckpt, metrics.csv rows)], or a
    one-line exit naming the run or file that is wrong (missing, unreadable, being trained,
    named twice, or a second copy of the same model and seed)."""
    out, seen, models = [], {}, {}
    for run in runs:
        real = os.path.realpath(run)
        if real in seen:
            sys.exit(f'error: {run} is named twice (as {seen[real]} too): each run counts once')
        seen[real] = run
        holder = utils.lock_holder(run) if os.path.isdir(run) else ''
        if holder:
            sys.exit(f'error: {run} is being trained by {holder}; compare it when that has finished')
        if not os.path.isfile(os.path.join(run, 'model.pt')):
            sys.exit(f'error: {run} has no model.pt (train it first: make compare trains every run)')
        model, ckpt = utils.or_exit(vae.load_checkpoint, os.path.join(run, 'model.pt'), device)
        a = ckpt['args']
        key = (rundir.model_name(a, model.lik), a['latent_dim'], a['seed'])
        if key in models:
            sys.exit(f'error: {run} and {models[key]} hold the same model ({key[0]}, latent dim {key[1]}, '
                     f'seed {key[2]}): it would count as two seeds; keep one')
        models[key] = run
        out.append((run, model, ckpt, read_metrics(run, ckpt.get('epochs_trained', a['epochs']))))
    return out


def evaluate_run(model, ckpt, metrics, test_x8, args, device, judge=None):
    """Row of likelihoods.csv and the per-image exact 8-bit log P(x) (None for bernoulli);
    judge: (classifier, test labels, test features) for the sample-quality columns, or None."""
    t0 = time.time()
    lik, a = model.lik, ckpt['args']
    x8 = test_x8[:args.n_test].to(device)
    x = vae.eval_data(lik, x8)                            # what the model sees: the encoder's input
    xdeq = None
    if lik.density:        # the dequantisation bound's data
        xdeq = vae.dequantize(x8.cpu(), torch.Generator().manual_seed(vae.EVAL_SEED)).to(device)
    gen = torch.Generator(device).manual_seed(vae.EVAL_SEED)
    est = vae.importance_log_px(model, x, args.k, gen, x8, xdeq)   # (n,) each, mu (n, D)
    exact = est.exact8 is not None                        # what is ranked: the 8-bit pixels, where defined
    logp = est.ranked.cpu()
    n = logp.shape[0]
    b = max(1, vae.chunk(x.device) // max(CURVE))
    curve_lw = torch.cat([vae.log_weights(model, x[s:s + b], max(CURVE), gen, x8[s:s + b]).ranked
                          for s in range(0, min(n, args.n_curve), b)], 1)
    row = {'dist': rundir.model_name(a, lik), 'seed': a['seed'], 'latent_dim': a['latent_dim'],
           'epochs': len(metrics), 'best_epoch': ckpt['epoch'], 'train_seconds': sum(r['seconds'] for r in metrics),
           'test_data': lik.data_name, 'scored_on': '8-bit pixels (exact)' if exact else
           f'{lik.data_name} (not ranked)', 'n_test': n,
           'test_elbo_nats': (est.recon - est.kl).mean().item(), 'test_recon_nats': est.recon.mean().item(),
           'test_kl_nats': est.kl.mean().item(), 'iwae_nats': logp.mean().item(), 'iwae_k': args.k,
           'iwae_stderr': (logp.std() / math.sqrt(n)).item(),
           'active_units': int((est.mu.var(0) > 0.01).sum()), 'k_curve_n': curve_lw.shape[1],
           **{f'iwae_k{k}_nats': vae.iwae(curve_lw, k).mean().item() for k in CURVE},
           **lik.diagnostics(model, x8)}
    logp8 = logp if exact else None
    if logp8 is not None:
        row['nll_8bit_nats'] = -logp8.mean().item()
        row['bits_per_dim'] = row['nll_8bit_nats'] / vae.BITS
    if est.bound is not None:
        row['bound_nll_8bit_nats'] = -est.bound.mean().item()
        row['bound_bits_per_dim'] = row['bound_nll_8bit_nats'] / vae.BITS
    if judge is not None:
        t1 = time.time()
        clf, labels, real = judge
        row.update(quality.sample_quality(model, clf, x8, labels, n=args.n_samples, real=real), quality_n=args.n_samples)
        row['quality_seconds'] = time.time() - t1
    row['eval_seconds'] = time.time() - t0
    return row, logp8


def read_metrics(run_dir, epochs):
    """The rows of the run's metrics.csv for the `epochs` epochs model.pt was chosen from, as
    {epoch, seconds, val_elbo_nats, val_nelbo_8bit_bpd (None where absent)}; a one-line exit
    naming the file if it is missing or not train.py's."""
    path = os.path.join(run_dir, 'metrics.csv')
    try:
        with open(path, newline='') as f:
            rows = [{'epoch': int(r['epoch']), 'seconds': float(r['seconds']), 'val_elbo_nats': float(r['val_elbo_nats']),
                     'val_nelbo_8bit_bpd': float(r['val_nelbo_8bit_bpd']) if r.get('val_nelbo_8bit_bpd') else None}
                    for r in csv.DictReader(f)]
    except OSError as e:
        sys.exit(f'error: cannot read {path} ({e.strerror}): the training time and learning curve come from it')
    except (KeyError, TypeError, ValueError, csv.Error):
        sys.exit(f'error: {path} is not a metrics.csv written by train.py (no epoch, seconds and val_elbo_nats columns)')
    rows = [r for r in rows if r['epoch'] <= epochs]
    if [r['epoch'] for r in rows] != list(range(1, epochs + 1)) or not all(
            math.isfinite(r['seconds']) and r['seconds'] >= 0 for r in rows):
        sys.exit(f'error: {path} holds {len(rows)} valid epochs of the {epochs} model.pt was trained for')
    return rows


# -----------------------------------------------------------------------------
# tables and figures


def mean_ci(values):
    """Mean and 95% Student-t interval over seeds (None, None for one value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None, None
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    from scipy.stats import t as student_t
    t = student_t.ppf(0.975, n - 1)
    return m, m - t * sd / math.sqrt(n), m + t * sd / math.sqrt(n)


def summarise(rows):
    out = []
    for dist in dict.fromkeys(r['dist'] for r in rows):
        rs = [r for r in rows if r['dist'] == dist]
        s = {'dist': dist, 'n_seeds': len(rs), 'scored_on': rs[0]['scored_on']}
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


def plot_results(rows, summary, path):
    plt = utils.pyplot()
    eight = sorted((s for s in summary if s['bits_per_dim_mean'] is not None), key=lambda s: s['bits_per_dim_mean'])
    binar = [s for s in summary if s['bits_per_dim_mean'] is None]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={'width_ratios': [4, 1]})
    # the exact values set the scale; a bound far above them is drawn at the top, its value written
    top = 1.5 * max(s['bits_per_dim_mean'] for s in eight) if eight else 1.0
    for i, s in enumerate(eight):
        rs = [r for r in rows if r['dist'] == s['dist']]
        if s['n_seeds'] > 1:   # 95% interval over seeds
            lo, hi = s['bits_per_dim_ci95_lo'], s['bits_per_dim_ci95_hi']
        else:                  # 95% interval over test images
            half = 1.96 * rs[0]['iwae_stderr'] / vae.BITS
            lo, hi = s['bits_per_dim_mean'] - half, s['bits_per_dim_mean'] + half
        ax.errorbar([i], [s['bits_per_dim_mean']], yerr=[[s['bits_per_dim_mean'] - lo], [hi - s['bits_per_dim_mean']]],
                    fmt='o', color='C0', capsize=4, ms=8)
        ax.plot([i] * len(rs), [r['bits_per_dim'] for r in rs], '.', color='gray')
        bound = s['bound_bits_per_dim_mean']
        if bound is not None:   # a density's dequantisation bound, shown beside
            ax.plot([i], [min(bound, top)], 'v' if bound <= top else '^', mfc='none', color='C1', ms=8)
            if bound > top:
                ax.annotate(f'bound {bound:.4g}', (i, top), xytext=(0, -16), textcoords='offset points',
                            ha='center', fontsize=8, color='C1')
    ax.set_xticks(range(len(eight)), [s['dist'] for s in eight])
    ax.set_ylabel('bits/dim on the 8-bit test pixels (lower is better)')
    ax.plot([], [], 'o', color='C0', label='exact log P of the 8-bit pixels (IWAE), ranked')
    ax.plot([], [], 'v', mfc='none', color='C1', label='density: dequantisation bound (an upper bound, not ranked)')
    ax.legend(fontsize=9)
    ax.set_title(f'8-bit MNIST test set, IWAE k = {rows[0]["iwae_k"]}, n = {rows[0]["n_test"]}', fontsize=10)
    ax.set_ylim(0, top * 1.05)
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
    bx.set_title(f"{binar[0]['scored_on'].split(' (')[0] if binar else 'other'} test set\n(a different data set)", fontsize=10)
    bx.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    utils.save_png(fig, path)


def plot_learning_curves(curves, path):
    """learning_curves.png: per run, the validation curve on one axis per data set (8-bit pixels
    in bits/dim; binarised digits in nats), a ring at the epoch whose checkpoint was scored."""
    plt = utils.pyplot()
    eight = [c for c in curves if c['eight']]
    other = [c for c in curves if not c['eight']]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={'width_ratios': [3, 2]})
    colours = {d: f'C{i}' for i, d in enumerate(dict.fromkeys(c['dist'] for c in curves))}
    for ax, cs, key, sign, label in [
            (axes[0], eight, 'val_nelbo_8bit_bpd', 1, 'validation -ELBO of the 8-bit pixels, bits/dim'),
            (axes[1], other, 'val_elbo_nats', -1, 'validation -ELBO, nats per image')]:
        for c in cs:   # epochs without a finite value (an older metrics.csv, a non-finite epoch) left out
            kept = [r for r in c['rows'] if r[key] is not None and math.isfinite(r[key])]
            epochs = [r['epoch'] for r in kept]
            ys = [sign * r[key] for r in kept]
            first = c is next(d for d in cs if d['dist'] == c['dist'])
            ax.plot(epochs, ys, '-', color=colours[c['dist']], lw=1.2, label=c['dist'] if first else None)
            if c['best_epoch'] in epochs:
                i = epochs.index(c['best_epoch'])
                ax.plot([epochs[i]], [ys[i]], 'o', mfc='none', color=colours[c['dist']], ms=8)
        ax.set_xlabel('epoch')
        ax.set_ylabel(label + ' (lower is better)', fontsize=9)
        ax.grid(alpha=0.3)
        if cs:
            ax.legend(fontsize=8)
    axes[0].set_title('8-bit likelihoods (one line per run; o: the checkpoint scored)', fontsize=10)
    axes[1].set_title(f"{other[0]['data'] if other else 'binarised'} digits (a different data set)", fontsize=10)
    # the range where the curves meet, not the first epochs' values; every scored epoch inside it
    tail = sorted(r['val_nelbo_8bit_bpd'] for c in eight for i, r in enumerate(c['rows'])
                  if (i >= len(c['rows']) // 4 or r['epoch'] == c['best_epoch'])
                  and r['val_nelbo_8bit_bpd'] is not None and math.isfinite(r['val_nelbo_8bit_bpd']))
    if tail:
        axes[0].set_ylim(tail[0] - 0.05 * (tail[-1] - tail[0]) - 0.01, tail[-1] + 0.1 * (tail[-1] - tail[0]) + 0.01)
    fig.tight_layout()
    utils.save_png(fig, path)


@torch.inference_mode()
def plot_rows(models, test_x8, out_dir):
    """samples.png and reconstructions.png: one row per likelihood, decoder means next to
    true samples of p(x|z) (prior draws z ~ N(0, I); reconstructions at z = mu(x))."""
    plt = utils.pyplot()
    for name, recon in [('samples.png', False), ('reconstructions.png', True)]:
        n = len(models) + recon
        fig, axes = plt.subplots(n, 2, figsize=(10, 0.75 * n + 0.6), squeeze=False)
        if recon:
            axes[0, 0].imshow(utils.grid(test_x8[:8].float() / 255, 8), cmap='gray', vmin=0, vmax=1)
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
            axes[i, 0].imshow(utils.grid(model.lik.mean(h), 8), cmap='gray', vmin=0, vmax=1)
            axes[i, 1].imshow(utils.grid(model.lik.sample(h), 8), cmap='gray', vmin=0, vmax=1)
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
        utils.save_png(fig, os.path.join(out_dir, name))


def plot_quality(summary, judge, path):
    """quality.png: bits/dim (x) against the Fréchet distance (y) of the decoder means and of the
    samples of p(x|z), a point per likelihood, with 95 % intervals: over seeds where there are
    several, else +-1.96 standard errors (over test images; FD: over prior samples, bootstrap)."""
    rows = [s for s in summary if s['bits_per_dim_mean'] is not None and s.get('fd_decoder_mean_mean') is not None]
    if judge is None or not rows:
        return
    plt = utils.pyplot()
    from matplotlib.ticker import FormatStrFormatter
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, what in zip(axes, ('decoder_mean', 'px_sample')):
        for s in rows:
            err = lambda k, se: 1.96 * se if s[f'{k}_ci95_lo'] is None else [  # noqa: E731
                [s[f'{k}_mean'] - s[f'{k}_ci95_lo']], [s[f'{k}_ci95_hi'] - s[f'{k}_mean']]]
            ax.errorbar(s['bits_per_dim_mean'], s[f'fd_{what}_mean'], xerr=err('bits_per_dim', s['iwae_stderr_mean'] / vae.BITS),
                        yerr=err(f'fd_{what}', s[f'fd_{what}_stderr_mean']), fmt='o', capsize=3)
            ax.annotate(s['dist'], (s['bits_per_dim_mean'], s[f'fd_{what}_mean']), fontsize=8,
                        xytext=(4, 4), textcoords='offset points')
        ax.set_xlabel('test bits/dim, exact 8-bit (lower is better)')
        ax.set_ylabel(f"Fréchet distance, classifier features ({quality.QUALITY_COLUMNS[f'fd_{what}'].split(', ')[1]})",
                      fontsize=8)
        ax.set_yscale('log')
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):   # 30, not 3 x 10^1
            axis(FormatStrFormatter('%g'))
        ax.grid(alpha=0.3)
    axes[0].set_title('decoder means of prior samples', fontsize=10)
    axes[1].set_title('samples of p(x|z) of prior samples', fontsize=10)
    fig.suptitle(f"likelihood against sample quality (judge: a CNN trained here, test accuracy "
                 f"{100 * judge[1]['test_accuracy']:.2f} %; lower is better on both axes)", fontsize=10)
    fig.tight_layout()
    utils.save_png(fig, path)


def print_quality(rows, judge):
    if judge is None:
        return
    print(f"\nsample quality, judged by the classifier (test accuracy {100 * judge[1]['test_accuracy']:.2f} %): "
          f"{rows[0]['quality_n']} prior samples against {rows[0]['n_test']} test images")
    print(f"{'dist':16s} {'seed':>4s} {'FD mean':>9s} {'FD sample':>9s} {'IS mean':>7s} {'IS smp':>7s} "
          f"{'H(y) mean':>9s} {'H(y) smp':>8s} {'recon acc':>9s} {'s':>5s}")
    for r in rows:
        print(f"{r['dist']:16s} {r['seed']:4d} {r['fd_decoder_mean']:9.2f} {r['fd_px_sample']:9.2f} "
              f"{r['is_decoder_mean']:7.2f} {r['is_px_sample']:7.2f} {r['label_entropy_decoder_mean']:9.3f} "
              f"{r['label_entropy_px_sample']:8.3f} {100 * r['recon_accuracy']:8.2f}% {r['quality_seconds']:5.0f}")
    total = sum(r['quality_seconds'] for r in rows)
    print(f"  (FD: Fréchet distance of the classifier's penultimate features; IS: its inception score, 10 at most; "
          f"H(y): entropy of the predicted labels, log 10 = 2.303 when uniform; sample quality took {total:.0f} s "
          f"of the evaluation's {sum(r['eval_seconds'] for r in rows):.0f} s)")


def diagnostic_note(row, columns):
    """A line on a row's likelihood-specific columns {column: what it is} ('' without any)."""
    return (f"{row['dist']} (seed {row['seed']}): " + '; '.join(f'{what} {row[c]:.2f} nats' for c, what in columns.items())
            if columns else '')


def print_tables(rows, bfs, notes):
    eight = sorted((r for r in rows if r.get('bits_per_dim') is not None), key=lambda r: r['bits_per_dim'])
    r0 = rows[0]
    print(f"\n8-bit test pixels, exact log P(x): IWAE k = {r0['iwae_k']} on {r0['n_test']} images (bits/dim, lower "
          f"is better; 'bound': a density's dequantisation bound, an upper bound, not ranked)")
    print(f"{'dist':16s} {'seed':>4s} {'bits/dim':>9s} {'NLL nats':>10s} {'+-se':>6s} {'bound':>8s} {'ELBO':>10s} "
          f"{'KL':>7s} {'AU':>3s} {'k=1':>9s} {'k=10':>9s} {'k=100':>9s} {'k=1000':>9s} {'eval s':>7s}")
    for r in eight:
        bound = f"{r['bound_bits_per_dim']:8.4f}" if r.get('bound_bits_per_dim') is not None else f"{'':8s}"
        print(f"{r['dist']:16s} {r['seed']:4d} {r['bits_per_dim']:9.4f} {r['nll_8bit_nats']:10.2f} "
              f"{r['iwae_stderr']:6.2f} {bound} {r['test_elbo_nats']:10.2f} {r['test_kl_nats']:7.2f} {r['active_units']:3d} "
              + ' '.join(f"{r[f'iwae_k{k}_nats']:9.2f}" for k in CURVE) + f" {r['eval_seconds']:7.0f}")
    print(f"  (the k-curve is log P of the 8-bit pixels on the first {r0['k_curve_n']} images; ELBO and KL are on the "
          "data each model sees: its levels, bins, gray values or dequantised values)")
    for r in rows:
        if r.get('bits_per_dim') is None:
            print(f"\n{r['test_data']} test set ({r['dist']}, seed {r['seed']}; a different data set, not ranked): "
                  f"NLL {-r['iwae_nats']:.2f} +- {r['iwae_stderr']:.2f} nats, ELBO {r['test_elbo_nats']:.2f}, "
                  f"k-curve " + ', '.join(f"{-r[f'iwae_k{k}_nats']:.2f}" for k in CURVE))
    for note in notes:
        if note:
            print('\n' + note)
    if bfs:
        print('\nlog Bayes factors per image, log p_a(x) - log p_b(x) on the 8-bit pixels (nats, +- standard error):')
        for b in sorted(bfs, key=lambda b: -abs(b['mean_log_bf_nats'])):
            print(f"  seed {b['seed']}: {b['a']:>16s} vs {b['b']:16s} {b['mean_log_bf_nats']:10.2f} +- "
                  f"{b['stderr_nats']:.2f}  (a better on {100 * b['a_better_on_images']:.0f}% of images)")


# -----------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = utils.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', help='run directories holding model.pt and metrics.csv')
    p.add_argument('--data-dir', default='data')
    p.add_argument('--out', default='results')
    p.add_argument('--k', type=number(int, 1, 100000), default=100, help='importance samples per image')
    p.add_argument('--n-test', type=number(int, 1, 10000), default=10000)
    p.add_argument('--n-curve', type=number(int, 1, 10000), default=1000,
                   help='images for the k-curve (k = 1, 10, 100, 1000)')
    p.add_argument('--classifier', default='runs/classifier/model.pt',
                   help="the judge of sample quality (quality.py's model.pt; make classifier trains it)")
    p.add_argument('--n-samples', type=number(int, 0, 100000), default=10000,
                   help='prior samples for the sample-quality columns (0: none, and no classifier needed)')
    p.add_argument('--device', default='auto', choices=utils.DEVICES)
    return p.parse_args(argv)


def load_judge(args, device):
    """(classifier, its checkpoint) for the sample-quality columns; None with --n-samples 0."""
    if not args.n_samples:
        return None
    if not os.path.isfile(args.classifier):
        sys.exit(f'error: --classifier {args.classifier}: no such file; `make classifier DATA=...` trains the judge '
                 f'of sample quality (or --n-samples 0 leaves those columns out)')
    return utils.or_exit(quality.load_classifier, args.classifier, device, prefix='--classifier: ')


def git_commit():
    try:
        return subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    device = utils.pick_device(args.device)
    runs = check_runs(args.runs, device)
    test_x8, test_labels = utils.or_exit(utils.load_mnist, args.data_dir, errors=utils.DataError)['test']
    utils.writable_dir(args.out, '--out', OUTPUTS)
    judge = load_judge(args, device)
    judged = judge and (judge[0], test_labels[:args.n_test].to(device),      # the test images' features: once
                        quality.judge(judge[0], test_x8[:args.n_test].to(device).float() / 255)[0])
    info = {'torch': str(torch.__version__), 'git_commit': git_commit(),
            'device': f'{device} ({torch.get_num_threads()} threads)' if device.type == 'cpu' else
            f'{device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else device.type})'}
    rows, logp8, models, notes, curves = [], [], {}, [], []
    for run, model, ckpt, metrics in runs:
        row, lp8 = evaluate_run(model, ckpt, metrics, test_x8, args, device, judged)
        curves.append({'dist': row['dist'], 'data': model.lik.data_name, 'rows': metrics, 'best_epoch': ckpt['epoch'],
                       'eight': lp8 is not None})
        rows.append({**row, **info, 'classifier_test_accuracy': judge and judge[1]['test_accuracy']})
        logp8.append(lp8)
        models.setdefault(row['dist'], model)
        notes.append(diagnostic_note(row, model.lik.diagnostic_columns))
        print(f"{run}: {row['dist']} seed {row['seed']}: IWAE(k={args.k}) {row['iwae_nats']:.2f} nats"
              + (f", {row['bits_per_dim']:.4f} bits/dim (exact)" if 'bits_per_dim' in row else '')
              + (f", bound {row['bound_bits_per_dim']:.4f}" if 'bound_bits_per_dim' in row else '')
              + f"; evaluated in {row['eval_seconds']:.0f} s", flush=True)
    summary = summarise(rows)
    bfs = bayes_factors(rows, logp8)
    utils.write_csv(rows, os.path.join(args.out, 'likelihoods.csv'), columns())
    utils.write_csv(summary, os.path.join(args.out, 'likelihoods_summary.csv'),
                    ['dist', 'n_seeds', 'scored_on'] + [f'{k}_{s}' for k in SUMMARY for s in ('mean', 'ci95_lo', 'ci95_hi')])
    utils.write_csv(bfs, os.path.join(args.out, 'bayes_factors.csv'),
                    ['seed', 'a', 'b', 'mean_log_bf_nats', 'stderr_nats', 'a_better_on_images'])
    plot_results(rows, summary, os.path.join(args.out, 'likelihoods.png'))
    plot_quality(summary, judge, os.path.join(args.out, 'quality.png'))
    plot_rows(models, test_x8, args.out)
    plot_learning_curves(curves, os.path.join(args.out, 'learning_curves.png'))
    print_tables(rows, bfs, notes)
    print_quality(rows, judge)
    print(f"\nwrote {args.out}/{', '.join(OUTPUTS)}; evaluation took {time.time() - t0:.0f} s")


if __name__ == '__main__':
    main()
