"""Train the conv VAE on MNIST with one observation likelihood.

    python train.py --dist bernoulli --data-dir ../shared/mnist

Writes into --out-dir (default runs/<dist>-z<latent>-s<seed>, runs/iwae<K>/... for
--objective iwae): model.pt (the best epoch by what the likelihood is ranked by: the negative
ELBO of the 8-bit validation pixels in bits/dim; bernoulli, which has no 8-bit score, by its
validation ELBO or K-sample bound), metrics.csv (one row per epoch), reconstructions.png, samples.png.
All numbers are nats per image (the 8-bit score bits/dim); the ELBO always uses the normalised
log-probability of the likelihood's data (a density's, or its 8-bit bin masses under --fit
discrete) and KL weight 1, whatever objective (--kl-weight, MSE form, IWAE) was optimised.
"""
import utils
if __name__ == '__main__':
    utils.one_line_errors()   # first: from here on Ctrl-C, a full disk or OOM is one line, not a traceback

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import rundir  # noqa: E402
import vae  # noqa: E402
from utils import number  # noqa: E402

METRICS = ['epoch', 'seconds', 'train_loss', 'train_elbo_nats', 'val_elbo_nats', 'val_recon_nats',
           'val_kl_nats', 'val_iwae_nats', 'val_nelbo_8bit_bpd', 'eval_seconds', 'selected_by']

# -----------------------------------------------------------------------------
# helpers


def make_parser():
    p = utils.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dist', default='bernoulli', choices=list(vae.LIKELIHOODS), help='likelihood p(x|z)')
    p.add_argument('--latent-dim', type=number(int, 1, 4096), default=32)
    p.add_argument('--epochs', type=number(int, 1, 100000), default=20, help='the most epochs to train')
    p.add_argument('--patience', type=number(int, 0, 100000), default=0,
                   help='stop when the validation objective has not improved for this many epochs (0: never)')
    p.add_argument('--batch-size', type=number(int, 1, 50000), default=256)
    p.add_argument('--lr', type=number(float, 0, 1, low_open=True), default=1e-3)
    p.add_argument('--objective', default='elbo', choices=list(vae.OBJECTIVES),
                   help='training loss: the negative ELBO, or the negative K-sample importance-weighted '
                        'bound (IWAE, Burda et al. 2016; tighter, K decoder passes per image)')
    p.add_argument('--iw-samples', type=number(int, 1, 1000), default=5, help='K for --objective iwae')
    p.add_argument('--samples', type=number(int, 1, 1000), default=1,
                   help='L: Monte-Carlo samples of z per image for the reconstruction term')
    p.add_argument('--kl-weight', type=number(float, 0, 1e6), default=None,
                   help='weight of the KL in the training loss (default 1; sigma^2/784 for gaussian-fixed '
                        '--fit gray, which makes its MSE-form loss the exact negative ELBO up to scale)')
    for name, (opt, dists) in rundir.registry_options().items():        # as the likelihoods declare them
        p.add_argument('--' + name.replace('_', '-'), type=number(opt.type, *opt.range) if opt.range else opt.type,
                       choices=opt.choices, default=None, help=f"{', '.join(dists)}: {opt.help} (default {opt.default})")
    p.add_argument('--precision', default='auto', choices=['auto'] + list(vae.PRECISIONS),
                   help='bf16: the conv nets under bf16 autocast in training (likelihoods, KL and every '
                        'reported number stay fp32; evaluation is fp32); auto: bf16 where the device '
                        'has bf16 in hardware, else fp32')
    p.add_argument('--seed', type=number(int, 0, 2 ** 63 - 1), default=0)
    p.add_argument('--device', default='auto', choices=utils.DEVICES)
    p.add_argument('--data-dir', default='data', help='holds MNIST/raw/ (downloaded there if missing)')
    p.add_argument('--out-dir', default=None, help='default: runs/<dist>-z<latent>-s<seed>')
    p.add_argument('--subset', type=number(int, 1, 50000), default=None,
                   help='train on the first N training images only (quick runs)')
    p.add_argument('--val-subset', type=number(int, 1, 10000), default=None,
                   help='validate on the first N validation images only (quick runs)')
    p.add_argument('--compare-plan', type=number(int, 1, 10 ** 7), nargs=4, default=None,
                   metavar=('RUNS', 'K', 'N_TEST', 'N_CURVE'),
                   help='(make compare passes it to its first run) after the first epoch, print an estimate of the '
                        "comparison's wall time: RUNS runs like this one, then compare_likelihoods.py --k K "
                        '--n-test N_TEST --n-curve N_CURVE on them')
    p.add_argument('--resume', action='store_true',
                   help='continue the run in --out-dir from its last.pt (same flags; --epochs may grow)')
    p.add_argument('--overwrite', action='store_true',
                   help='start over in an --out-dir that holds a run, deleting that run first')
    return p


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    if args.objective == 'iwae' and (args.kl_weight is not None or args.samples != 1):
        p.error('--kl-weight and --samples shape the ELBO objective; --objective iwae takes --iw-samples K')
    lik = vae.LIKELIHOODS[args.dist]
    for name, (_, dists) in rundir.registry_options().items():
        flag, value, opt = '--' + name.replace('_', '-'), getattr(args, name), lik.options.get(name)
        if opt is None and value is not None:
            p.error(f"{flag} {value}: {args.dist} takes no {flag} (an option of {', '.join(dists)})")
        elif opt is not None and value is None:
            setattr(args, name, opt.default)             # recorded as what it resolved to
        elif opt is not None and opt.choices and value not in opt.choices:
            p.error(f"{flag} {value}: {args.dist} offers {', '.join(opt.choices)}")
    # runs/<fit>/... for a fit off its default, as the Makefile names it
    fit_dir = args.fit if 'fit' in lik.options and args.fit != lik.options['fit'].default else ''
    if args.out_dir is None:
        group = rundir.objective_tag(vars(args))[1:]          # iwae<K>/ or <objective>/ (none for the ELBO)
        args.out_dir = os.path.join('runs', group, fit_dir, f'{args.dist}-z{args.latent_dim}-s{args.seed}')
    return args


@torch.inference_mode()
def evaluate(model, x, x8, batch_size=250, iw_samples=None):
    """Mean ELBO, E_q[log p(x|z)] and KL over the images x (the likelihood's data of the 8-bit
    images x8), in nats per image, and the negative ELBO of the 8-bit images themselves in
    bits/dim (with the exact log P(x8|z); '' if the likelihood has none), with one z per image
    drawn from a fixed-seed generator (the same numbers for the same weights). With iw_samples
    K, also the K-sample bound (val_iwae_nats; else '')."""
    model.eval()
    t0 = time.time()
    gen = torch.Generator(x.device).manual_seed(vae.EVAL_SEED)
    gen_iw = torch.Generator(x.device).manual_seed(vae.EVAL_SEED + 1)   # the ELBO's draws as without it
    recon = kl = recon8 = bound = 0.0
    for xb, x8b in zip(x.split(batch_size), x8.split(batch_size)):
        h, mu, logvar = model(xb, generator=gen)                  # h (1, B, 28, 28, F)
        log_px = model.lik.log_prob(h, xb)                        # (1, B)
        log_p8 = model.lik.log_prob_8bit(h, x8b, log_px)          # (1, B) or None
        klb = vae.kl_normal(mu, logvar)
        recon += log_px.sum().item()
        kl += klb.sum().item()
        recon8 = None if log_p8 is None else recon8 + log_p8.sum().item()
        for xs in xb.split(max(1, batch_size // iw_samples)) if iw_samples else ():   # batch_size decodes at a time
            bound += vae.iwae_terms(model, xs, iw_samples, gen_iw)[0].sum().item()
    n = x.shape[0]
    return {'val_elbo_nats': (recon - kl) / n, 'val_recon_nats': recon / n, 'val_kl_nats': kl / n,
            'val_iwae_nats': bound / n if iw_samples else '',
            'val_nelbo_8bit_bpd': '' if recon8 is None else (kl - recon8) / n / vae.BITS,
            'eval_seconds': time.time() - t0}


# -----------------------------------------------------------------------------
# figures


@torch.inference_mode()
def save_figures(model, test_x, out_dir, title):
    """reconstructions.png: test digits, the decoder mean and a sample of p(x|z) at z = mu(x);
    samples.png: 64 draws z ~ N(0, I), decoder means next to samples of p(x|z)."""
    plt = utils.pyplot()
    model.eval()
    lik, gen = model.lik, torch.Generator(test_x.device).manual_seed(vae.EVAL_SEED)
    torch.manual_seed(vae.EVAL_SEED)  # the samples of p(x|z) below use the global RNG
    x = test_x[:16]
    h = model.decode(model.encode(x)[0])
    rows = [('test digits (as the likelihood sees them)', x), ('decoder mean', lik.mean(h)),
            ('sample of p(x|z)', lik.sample(h))]
    fig, axes = plt.subplots(3, 1, figsize=(10, 3.6))
    for ax, (name, imgs) in zip(axes, rows):
        ax.imshow(utils.grid(imgs, 16), cmap='gray', vmin=0, vmax=1)
        ax.set_title(name, fontsize=10)
        ax.axis('off')
    fig.suptitle(f'{title}: reconstructions at z = mu(x)')
    utils.save_png(fig, os.path.join(out_dir, 'reconstructions.png'), bbox_inches='tight')

    z = torch.randn(64, model.latent_dim, generator=gen, device=test_x.device)
    h = model.decode(z)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, (name, imgs) in zip(axes, [('decoder mean', lik.mean(h)), ('sample of p(x|z)', lik.sample(h))]):
        ax.imshow(utils.grid(imgs, 8), cmap='gray', vmin=0, vmax=1)
        ax.set_title(name + ' (clipped to [0, 1])' * lik.clipped)
        ax.axis('off')
    fig.suptitle(f'{title}: 64 prior samples z ~ N(0, I)')
    utils.save_png(fig, os.path.join(out_dir, 'samples.png'), bbox_inches='tight')


# -----------------------------------------------------------------------------
# training


def selection(lik, objective, iw_samples):
    """What picks the checkpoint and stops early, as (metrics.csv column, +1 or -1 for larger or
    smaller is better, words): a likelihood with an 8-bit score by that (the negative ELBO of the
    8-bit validation pixels, bits/dim), whatever it trains on; bernoulli by its objective."""
    if lik.scored:
        return 'val_nelbo_8bit_bpd', -1, 'val 8-bit negative ELBO (bits/dim)'
    if objective == 'iwae':
        return 'val_iwae_nats', 1, f'val IWAE-{iw_samples} bound (nats)'
    return 'val_elbo_nats', 1, 'val ELBO (nats)'


def compare_estimate(args, row, n_val):
    """The wall time of a comparison (--compare-plan RUNS K N_TEST N_CURVE), extrapolated from this
    run's first epoch: RUNS runs of --epochs epochs, then per run K draws for each of N_TEST test
    images and 1000 for each of N_CURVE (the k-curve), each draw costing what one draw of this
    epoch's validation did (the decoder, the likelihood and its exact 8-bit score)."""
    runs, k, n_test, n_curve = args.compare_plan
    train_s = runs * args.epochs * row['seconds']
    draws = n_val * (1 + (args.iw_samples if args.objective == 'iwae' else 0))   # validation's: its ELBO's and bound's
    eval_s = runs * row['eval_seconds'] / draws * (k * n_test + 1000 * min(n_curve, n_test))
    def hm(seconds):
        h, m = divmod(round(seconds / 60), 60)
        return f'{h} h {m:02d} min' if h else f'{m} min'
    return (f'estimate: the comparison takes about {hm(train_s + eval_s)} on this machine if every run costs what '
            f"this {args.dist} run does: {runs} runs of at most {args.epochs} epochs at {row['seconds']:.0f} s, "
            f'{hm(train_s)}, then their evaluation, {hm(eval_s)}. Likelihoods with bigger heads or exact scores '
            f'cost up to several times more (a first torch.compile a minute or two); early stopping less')


def optimizer(model, lr):
    """Adam; its fused kernel (one pass over all parameters) on the CPU and CUDA."""
    device = next(model.parameters()).device
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ('cpu', 'cuda'))


class NonFiniteLoss(FloatingPointError):
    """The training loss is NaN or inf (args[0]); the optimiser step was not taken."""
    batch = '?'


def train_step(model, opt, x, args, dtype=None):
    """One optimiser step on the batch x (B, 1, 28, 28): forward (the networks under autocast
    to dtype, if given), the loss of --objective (vae.OBJECTIVES) averaged over the batch,
    backward, Adam. Returns the mean loss and the per-image ELBO (B,)."""
    loss, elbo = vae.OBJECTIVES[args.objective](model, x, args, dtype)
    loss = loss.mean()
    if not torch.isfinite(loss):
        raise NonFiniteLoss(loss.item())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), elbo.detach()


def batches(lik, x8, gen, batch_size):
    """The uint8 images x8 (N, 1, 28, 28), already on the device, in an order drawn from gen,
    indexed out batch by batch and turned into the likelihood's data (binarised, dequantised,
    ...) on the fly: (B, 1, 28, 28) floats in [0, 1]."""
    for idx in torch.randperm(x8.shape[0], generator=gen, device=x8.device).split(batch_size):
        yield lik.data(x8[idx], gen)


def train_epoch(model, opt, train_x8, gen, args, desc=None, dtype=None):
    """One pass over the training images in batches of --batch-size (see batches). Returns the
    mean loss and ELBO per image."""
    model.train()
    n, loss_sum, elbo_sum = train_x8.shape[0], 0.0, 0.0
    n_batches = math.ceil(n / args.batch_size)
    bar = tqdm(batches(model.lik, train_x8, gen, args.batch_size), desc=desc, total=n_batches,
               leave=False, disable=None, mininterval=1)
    for i, x in enumerate(bar, 1):
        try:
            loss, elbo = train_step(model, opt, x, args, dtype)
        except NonFiniteLoss as e:
            e.batch = f'{i}/{n_batches}'
            raise
        loss_sum += loss.item() * x.shape[0]
        elbo_sum += elbo.sum().item()
        bar.set_postfix(loss=f'{loss.item():.2f}', refresh=False)
    return loss_sum / n, elbo_sum / n


def train_and_validate(model, opt, train_x8, val_x, val_x8, gen, args, epoch, iw, progress):
    """One epoch of training, then validation: the epoch's row of metrics.csv. A non-finite loss
    ends the run in one line, last.pt keeping the epoch before."""
    t0 = time.time()
    try:
        train_loss, train_elbo = train_epoch(model, opt, train_x8, gen, args, f'epoch {epoch}/{args.epochs}',
                                             vae.PRECISIONS[args.precision])
    except NonFiniteLoss as e:
        sys.exit(f'error: non-finite training loss ({e.args[0]}) at epoch {epoch}, batch {e.batch}; '
                 f"{os.path.join(args.out_dir, 'last.pt')} keeps epoch {progress.done}{progress.best_so_far()}"
                 '; no model.pt was written')
    row = {'epoch': epoch, 'train_loss': train_loss, 'train_elbo_nats': train_elbo,
           **evaluate(model, val_x, val_x8, iw_samples=iw)}
    row['seconds'] = time.time() - t0
    return row


def epoch_line(row, epochs, iw, improved):
    return (f"epoch {row['epoch']:3d}/{epochs}  train loss {row['train_loss']:10.3f}  "
            f"val ELBO {row['val_elbo_nats']:9.2f} nats (recon {row['val_recon_nats']:9.2f}, "
            f"KL {row['val_kl_nats']:6.2f})" + (f"  IWAE-{iw} {row['val_iwae_nats']:9.2f}" if iw else '')
            + (f"  8-bit {row['val_nelbo_8bit_bpd']:.4f} bits/dim" if row['val_nelbo_8bit_bpd'] != '' else '')
            + f"  {row['seconds']:5.1f} s{'  *' if improved else ''}")


def finish(model, progress, args, data, device, extra):
    """The best epoch's weights into the model, its figures and model.pt (args plus extra)."""
    if progress.best_state is None:
        sys.exit(f'error: the {progress.said} was never finite; no checkpoint was written')
    model.load_state_dict(progress.best_state)
    iw = f', IWAE K = {args.iw_samples}' if args.objective == 'iwae' else ''
    test_x = vae.eval_data(model.lik, data['test'][0])[:16].to(device)   # as the whole test set is fixed
    save_figures(model, test_x, args.out_dir, f'{args.dist}, latent dim {args.latent_dim}{iw}')
    path = os.path.join(args.out_dir, 'model.pt')
    progress.save_model(path, args, extra)
    print(f'best {progress.said} {progress.sign * progress.best:.4f} at epoch {progress.best_epoch}; wrote {path}, '
          f'metrics.csv, reconstructions.png, samples.png (and last.pt, for --resume --epochs N to continue)')


def train(args):
    """Check everything before writing anything (flags, data, a run already in --out-dir), then
    fit() while this process owns --out-dir."""
    if args.resume and args.overwrite:
        sys.exit('error: --resume continues the run in --out-dir, --overwrite deletes it: choose one')
    device = utils.pick_device(args.device)
    utils.keep_freed_memory()
    rundir.existing_run(args)             # refused before anything is loaded or written
    if args.resume:
        rundir.load_last(args, make_parser(), selection)   # its flags checked early; read again once owned
    if args.precision == 'auto':          # recorded as what it resolved to
        args.precision = 'bf16' if utils.native_bf16(device) else 'fp32'
    data = utils.or_exit(utils.load_mnist, args.data_dir, errors=utils.DataError)
    with rundir.owned(args, make_parser(), selection) as state:     # one process per --out-dir
        fit(args, device, data, state)


def fit(args, device, data, state=None):
    """Train from scratch or from a last.pt state, writing last.pt and metrics.csv every epoch
    and model.pt (the best epoch by selection()) at the end; Ctrl-C, SIGTERM or a kill
    leave last.pt for --resume."""
    torch.manual_seed(args.seed)
    model = vae.build(vars(args)).to(device)
    iw = args.iw_samples if args.objective == 'iwae' else None
    if note := model.lik.training_note(bool(iw)):
        print(note)
    train_x8 = data['train'][0][:args.subset].to(device)     # (N, 1, 28, 28) uint8
    val_x8 = data['val'][0][:args.val_subset].to(device)
    val_x = vae.eval_data(model.lik, val_x8)                 # fixed binarisation/noise
    gen = torch.Generator(device).manual_seed(args.seed)    # shuffling and data noise
    opt = optimizer(model, args.lr)
    progress = rundir.Progress(*selection(model.lik, args.objective, args.iw_samples))
    last = os.path.join(args.out_dir, 'last.pt')
    progress.start(state, last, args, model, opt, gen)
    print(f'training {args.dist} (latent dim {args.latent_dim}) on {train_x8.shape[0]} images, {device}, '
          f'{sum(p.numel() for p in model.parameters()):,} parameters -> {args.out_dir}', flush=True)
    try:
        for epoch in range(progress.done + 1, args.epochs + 1):
            if stop := progress.stalled(args.patience):
                print(stop, flush=True)
                break
            row = train_and_validate(model, opt, train_x8, val_x, val_x8, gen, args, epoch, iw, progress)
            improved = progress.record(row, model)
            utils.write_csv(progress.rows, os.path.join(args.out_dir, 'metrics.csv'), METRICS)
            progress.save_last(last, args, model, opt, gen)
            print(epoch_line(row, args.epochs, iw, improved), flush=True)
            if args.compare_plan and epoch == 1:
                print(compare_estimate(args, row, val_x.shape[0]), flush=True)
        finish(model, progress, args, data, device, {'kl_weight': 1.0 if iw else vae.kl_weight(model.lik, args)})
    except KeyboardInterrupt:          # a second Ctrl-C exits at once (utils.one_line_errors)
        print(f'\ninterrupted after epoch {progress.done} of {args.epochs}; {last} keeps it. Resume with:\n'
              f'  {rundir.command(args, make_parser())}', file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    train(parse_args())
