"""Slow tests, on real MNIST ($MNIST_DATA; `make test DATA=...` sets it), in subprocesses or
compiling: end-to-end runs, an exact resume after a kill, signals, one owner per run directory,
the comparison and the latent plots on tiny runs, the Makefile and the bench."""
import argparse
import csv
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

import compare_likelihoods as cmp
import distributions as D
from conftest import BENCH_TINY, HERE, bench_rows, beta_bins_of, beta_head_features, metric_values, untrained_judge
import plot_latent
import quality
import train
import utils
import vae

pytestmark = pytest.mark.slow

# -----------------------------------------------------------------------------
# torch.compile: beta's fused loops


@pytest.mark.parametrize('grad', [False, True])
def test_a_compiled_loop_equals_its_eager_function(monkeypatch, grad):
    """torch.compile's fused C++ (or Triton) loop computes what the eager function does, with and
    without the derivatives; compiled at 4 series terms, the first-bin loop only, so that a cold
    cache compiles in seconds. Where nothing can compile it, the eager path is what runs, and
    this test says so."""
    bins = [t[:4000] for t in beta_bins_of(*beta_head_features(2))]
    fn = partial(D._series_first, terms=4, grad=grad)
    got = D.Fused(fn)(*bins)
    if got is None:
        pytest.skip(f'torch.compile cannot compile here ({D.Fused.fell_back}): the loops run eagerly')
    got, want = (torch.stack(t, -1) if grad else t for t in (got, fn(*bins)))
    assert torch.equal(got.isnan(), want.isnan()) and 0 < (~want.isnan()).sum() < want.numel()
    torch.testing.assert_close(got[~got.isnan()], want[~want.isnan()], rtol=1e-13, atol=1e-13)

# -----------------------------------------------------------------------------
# data errors, the non-finite guard, and an end-to-end run


def test_train_end_to_end(tmp_path, mnist_dir):
    out = tmp_path / 'run'
    cmd = [sys.executable, os.path.join(HERE, 'train.py'), '--dist', 'bernoulli', '--data-dir', mnist_dir,
           '--out-dir', str(out), '--subset', '512', '--val-subset', '1000', '--epochs', '1', '--latent-dim', '2',
           '--precision', 'bf16']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for f in ['model.pt', 'metrics.csv', 'reconstructions.png', 'samples.png']:
        assert (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert len(rows) == 1 and list(rows[0]) == train.METRICS
    assert rows[0]['val_nelbo_8bit_bpd'] == ''        # binarised digits: no 8-bit score
    assert rows[0]['val_iwae_nats'] == ''             # trained on the ELBO: no K-sample bound
    assert all(math.isfinite(float(v)) for k, v in rows[0].items() if k not in ('val_nelbo_8bit_bpd', 'val_iwae_nats', 'selected_by'))
    # the checkpoint is self-describing and is the model that was validated
    ckpt = torch.load(out / 'model.pt', weights_only=True)
    assert ckpt['args']['dist'] == 'bernoulli' and ckpt['args']['latent_dim'] == 2
    model, _ = vae.load_checkpoint(str(out / 'model.pt'))
    lik = model.lik
    val8 = utils.load_mnist(mnist_dir)['val'][0][:1000]                  # --val-subset 1000
    elbo = train.evaluate(model, vae.eval_data(lik, val8), val8)['val_elbo_nats']
    assert abs(elbo - float(rows[0]['val_elbo_nats'])) < 1e-3
    import matplotlib.image
    img = matplotlib.image.imread(out / 'reconstructions.png')
    assert img.shape[0] > 100 and img.shape[1] > 400 and img.std() > 0.05  # not blank

# -----------------------------------------------------------------------------
# interrupt, resume, determinism


TINY = ['--subset', '1024', '--val-subset', '500', '--batch-size', '128', '--epochs', '2', '--latent-dim', '2', '--seed', '3']


def train_cmd(out, mnist_dir, *extra):
    return [sys.executable, os.path.join(HERE, 'train.py'), '--data-dir', mnist_dir, '--out-dir', str(out), *TINY, *extra]


def same_weights(a, b):
    sa, sb = (torch.load(p / 'model.pt', weights_only=True) for p in (a, b))
    return sa['epoch'] == sb['epoch'] and all(torch.equal(sa['state_dict'][k], sb['state_dict'][k]) for k in sa['state_dict'])


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp('reference') / 'run'
    r = subprocess.run(train_cmd(out, mnist_dir), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def test_same_seed_same_flags_give_identical_metrics(reference_run, tmp_path, mnist_dir):
    r = subprocess.run(train_cmd(tmp_path / 'again', mnist_dir), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(metric_values(reference_run)) == 2
    assert metric_values(tmp_path / 'again') == metric_values(reference_run)
    assert same_weights(tmp_path / 'again', reference_run)


@pytest.mark.parametrize('sig', ['SIGKILL', 'SIGTERM', 'SIGINT'])
def test_a_run_killed_mid_epoch_and_resumed_matches_the_uninterrupted_run(reference_run, tmp_path, mnist_dir, sig):
    import signal
    import time
    out = tmp_path / 'run'
    # SIGINT as a terminal's Ctrl-C delivers it: a background job of a non-interactive shell (as
    # CI may run us) inherits SIGINT ignored, and the child would never see it
    # each step 0.1 s slower (the numbers unchanged), so that the signal lands inside epoch 2 on any machine
    slow = 'import time, vae\nterms = vae.elbo_terms\nvae.elbo_terms = lambda *a, **k: (time.sleep(0.1), terms(*a, **k))[1]'
    p = subprocess.Popen(patched(slow, 'train.py', *train_cmd(out, mnist_dir)[2:]), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=HERE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not ((out / 'metrics.csv').exists() and len(metric_values(out)) >= 1):   # epoch 1 done ...
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)                                                                  # ... now inside epoch 2
    assert p.poll() is None
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and not (out / 'model.pt').exists()
    if sig != 'SIGKILL':   # Ctrl-C and SIGTERM: last.pt kept, and how to resume said
        assert p.returncode == 130 and 'Resume with:' in err and '--resume' in err and 'Traceback' not in err, err
    r = subprocess.run(train_cmd(out, mnist_dir, '--resume'), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'resuming' in r.stdout, r.stderr
    assert metric_values(out) == metric_values(reference_run)
    assert same_weights(out, reference_run)


def test_resume_needs_last_pt_and_the_same_flags(reference_run, tmp_path, mnist_dir):
    with pytest.raises(SystemExit) as e:
        train.train(train.parse_args(['--data-dir', mnist_dir, '--out-dir', str(tmp_path / 'none'), '--resume']))
    assert 'no ' in str(e.value.code) and 'last.pt to resume from' in str(e.value.code)
    before = (reference_run / 'metrics.csv').read_bytes()
    with pytest.raises(SystemExit) as e:
        train.train(train.parse_args(['--data-dir', mnist_dir, '--out-dir', str(reference_run), *TINY,
                                      '--latent-dim', '3', '--resume']))
    assert 'written with --latent-dim 2, this run has --latent-dim 3' in str(e.value.code)
    with pytest.raises(SystemExit) as e:     # a bernoulli run handed to a beta run
        train.train(train.parse_args(['--data-dir', mnist_dir, '--out-dir', str(reference_run), *TINY,
                                      '--dist', 'beta', '--resume']))
    assert 'written with --dist bernoulli, this run has --dist beta' in str(e.value.code)
    assert (reference_run / 'metrics.csv').read_bytes() == before                    # nothing overwritten

# -----------------------------------------------------------------------------
# compare_likelihoods.py


@pytest.fixture(scope='session')
def tiny_runs(tmp_path_factory, mnist_dir):
    """Tiny trained runs (1 epoch on 512 images, latent dim 2): categorical with 16 bins (an
    exact discrete likelihood), and gaussian (a density, scored through the bound) on two seeds."""
    root = tmp_path_factory.mktemp('runs')
    runs = []
    for dist, seed, extra in [('categorical', 0, ['--bins', '16']), ('gaussian', 0, []), ('gaussian', 1, [])]:
        out = root / f'{dist}-s{seed}'
        train.train(train.parse_args(['--dist', dist, '--data-dir', mnist_dir, '--out-dir', str(out), '--seed',
                                      str(seed), '--subset', '512', '--val-subset', '500', '--epochs', '1',
                                      '--latent-dim', '2'] + extra))
        runs.append(str(out))
    return runs

# -----------------------------------------------------------------------------
# the judge of sample quality (quality.py) on real digits


@pytest.fixture(scope='session')
def judge(tmp_path_factory, mnist_dir):
    """quality.py's classifier trained 1 epoch on the first 10,000 training images (about 98 %):
    enough to tell digits from noise, which is what these tests ask of it."""
    data = utils.load_mnist(mnist_dir)
    small = {**data, 'train': tuple(t[:10000] for t in data['train'])}
    out = tmp_path_factory.mktemp('judge')
    mp = pytest.MonkeyPatch()
    mp.setattr(utils, 'load_mnist', lambda root: small)
    try:
        ckpt = quality.main(['--data-dir', mnist_dir, '--out-dir', str(out), '--epochs', '1'])
    finally:
        mp.undo()
    return quality.load_classifier(out / 'model.pt')[0], ckpt, data


def test_the_judge_tells_digits_from_noise_and_blur(judge):
    """The Fréchet distance in its features: the test set against itself about 0, the training
    images a small distance from it, noise and blurred digits a large one; the labels it gives
    one class have a low entropy."""
    clf, ckpt, data = judge
    assert ckpt['test_accuracy'] > 0.95
    test = data['test'][0].float() / 255
    f_test, _ = quality.judge(clf, test)
    fd = lambda x: quality.frechet_distance(f_test, quality.judge(clf, x)[0])  # noqa: E731
    train_fd = fd(data['train'][0][40000:].float() / 255)         # training images it has not seen
    noise_fd = fd(torch.rand(10000, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    blurred_fd = fd(torch.nn.functional.avg_pool2d(test, 5, 1, 2))
    assert abs(fd(test)) < 1e-6
    assert train_fd < blurred_fd / 10 and train_fd < noise_fd / 10, (train_fd, blurred_fd, noise_fd)
    threes = test[data['test'][1] == 3]
    _, entropy = quality.inception_score(quality.judge(clf, threes)[1])
    _, every = quality.inception_score(quality.judge(clf, test)[1])
    assert entropy < 0.5 and every > 2.2, (entropy, every)       # log 10 = 2.30: uniform


# -----------------------------------------------------------------------------
# the IWAE objective (train.py --objective iwae)


def test_iwae_is_above_the_elbo_and_grows_with_k(tiny_runs, mnist_dir):
    model, _ = vae.load_checkpoint(os.path.join(tiny_runs[0], 'model.pt'))
    x8 = utils.load_mnist(mnist_dir)['test'][0][:200]
    w = vae.log_weights(model, vae.eval_data(model.lik, x8), 100, torch.Generator().manual_seed(0), x8)
    lw, log_px, kl = w.data, w.recon, w.kl
    assert lw.shape == w.exact8.shape == (100, 200) and w.mu.shape == (200, 2) and w.bound is None
    est = {k: vae.iwae(lw, k).mean().item() for k in (1, 2, 10, 100)}
    elbo = (log_px - kl).mean().item()
    # k = 1 is the ELBO (with a sampled KL); every larger k is above it, and grows with k
    assert abs(est[1] - elbo) < 0.01 * abs(elbo)
    assert elbo < est[2] < est[10] < est[100]
    se = vae.iwae(lw, 100).std() / math.sqrt(200)
    assert se > 0


def test_compare_script_on_tiny_runs(tiny_runs, mnist_dir, tmp_path):
    out = tmp_path / 'results'
    cmp.main(tiny_runs + ['--data-dir', mnist_dir, '--out', str(out), '--k', '4', '--n-test', '64',
                          '--n-curve', '2', '--classifier', untrained_judge(tmp_path / 'judge.pt'), '--n-samples', '100'])
    rows = list(csv.DictReader(open(out / 'likelihoods.csv')))
    listed = ['dist', 'seed', 'latent_dim', 'epochs', 'train_seconds', 'test_elbo_nats', 'test_recon_nats',
              'test_kl_nats', 'iwae_nats', 'iwae_k', 'iwae_stderr', 'bits_per_dim', 'bound_bits_per_dim',
              'scored_on', 'active_units', 'torch', 'git_commit', 'device']
    assert len(rows) == 3 and set(listed) <= set(rows[0])
    assert all(math.isfinite(float(r[c])) for r in rows for c in quality.QUALITY_COLUMNS)
    assert (out / 'quality.png').exists()
    assert [(r['dist'], r['seed']) for r in rows] == [('categorical-K16', '0'), ('gaussian', '0'), ('gaussian', '1')]
    by = {r['dist']: r for r in rows[:2]}
    assert by['categorical-K16']['scored_on'] == by['gaussian']['scored_on'] == '8-bit pixels (exact)'
    assert by['categorical-K16']['bound_bits_per_dim'] == ''          # a discrete likelihood has no bound
    for r in rows[1:]:                                                # a density: exact, and its bound above
        assert float(r['bits_per_dim']) < float(r['bound_bits_per_dim'])
        assert -float(r['iwae_nats']) == float(r['nll_8bit_nats'])
    for r in rows:
        assert r['iwae_k'] == '4' and r['n_test'] == '64' and float(r['iwae_stderr']) > 0
        assert r['epochs'] == '1' and r['best_epoch'] == '1'
        assert 0 < float(r['bits_per_dim']) < 20 and 0 <= int(r['active_units']) <= 2
    summary = {s['dist']: s for s in csv.DictReader(open(out / 'likelihoods_summary.csv'))}
    assert list(summary) == ['categorical-K16', 'gaussian']
    cat, gau = summary['categorical-K16'], summary['gaussian']
    assert cat['n_seeds'] == '1' and cat['bits_per_dim_ci95_lo'] == ''   # one seed: no interval
    bpd = [float(r['bits_per_dim']) for r in rows[1:]]                    # two seeds: t interval
    assert gau['n_seeds'] == '2' and math.isclose(float(gau['bits_per_dim_mean']), sum(bpd) / 2, rel_tol=1e-4)
    assert float(gau['bits_per_dim_ci95_lo']) < min(bpd) <= max(bpd) < float(gau['bits_per_dim_ci95_hi'])
    bfs = list(csv.DictReader(open(out / 'bayes_factors.csv')))           # pairs within a seed only
    diff = -float(by['categorical-K16']['nll_8bit_nats']) + float(by['gaussian']['nll_8bit_nats'])
    assert len(bfs) == 1 and abs(float(bfs[0]['mean_log_bf_nats']) - diff) < 1e-2 + 2e-5 * abs(diff)  # 6 digits
    import matplotlib.image
    for name in ['likelihoods.png', 'samples.png', 'reconstructions.png', 'learning_curves.png']:
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 100 and img.std() > 0.05, name

# -----------------------------------------------------------------------------
# plot_latent.py


def test_plot_latent_on_tiny_checkpoints(tiny_runs, mnist_dir, tmp_path):
    out, n = tmp_path / 'results', 300
    figs = plot_latent.main(['--ckpt', tiny_runs[0], '--n', str(n), '--out', str(out), '--data-dir', mnist_dir,
                             '--k', '3', '--n-nll', '40', '--grid', '5'])
    latent, manifold = out / 'latent_categorical-K16.png', out / 'manifold_categorical-K16.png'
    assert set(figs) == {str(latent), str(manifold)} and latent.stat().st_size > 0 and manifold.stat().st_size > 0
    # the scatter: exactly the encoder means of the first n test images, each in its digit's colour
    model, _ = vae.load_checkpoint(os.path.join(tiny_runs[0], 'model.pt'))
    x8, labels = utils.load_mnist(mnist_dir)['test']
    with torch.no_grad():
        mu = model.encode(vae.eval_data(model.lik, x8[:n]))[0]
    ax = figs[str(latent)].axes[0]
    assert [c.get_label() for c in ax.collections] == [str(d) for d in range(10)]
    assert sum(len(c.get_offsets()) for c in ax.collections) == n
    for d, c in enumerate(ax.collections):
        torch.testing.assert_close(torch.tensor(c.get_offsets().data).float(), mu[labels[:n] == d], rtol=0, atol=1e-6)
    # the title's NLL is the comparison's number for the same k and images
    (_, model, ckpt, seconds), = cmp.check_runs(tiny_runs[:1], torch.device('cpu'))
    row = cmp.evaluate_run(model, ckpt, seconds, x8, argparse.Namespace(k=3, n_test=40, n_curve=1), torch.device('cpu'))[0]
    title = ax.get_title()
    assert 'categorical likelihood' in title and f"test NLL {row['nll_8bit_nats']:.1f} " in title
    assert f"= {row['bits_per_dim']:.3f} bits/dim" in title
    # the manifold: a 5 x 5 grid of 28 x 28 decoder means
    img = torch.as_tensor(figs[str(manifold)].axes[0].get_images()[0].get_array())
    assert img.shape == (5 * 28, 5 * 28) and img.std() > 0.01
    with torch.no_grad():                      # cell (i, j) is the decoder mean at z = (q[j], q[4 - i])
        want = model.lik.mean(model.decode(plot_latent.manifold_latents(5, torch.eye(2)))).view(5, 5, 28, 28)
    for i, j in [(0, 0), (0, 4), (2, 3), (4, 1)]:
        torch.testing.assert_close(img[28 * i:28 * i + 28, 28 * j:28 * j + 28], want[i, j], rtol=0, atol=1e-5)
    # --all: one panel per checkpoint, titled with the kNN accuracy of the plotted points
    figs = plot_latent.main(['--ckpt', tiny_runs[0], tiny_runs[1], '--n', str(n), '--all', str(out / 'all.png'),
                             '--data-dir', mnist_dir])
    axes = figs[str(out / 'all.png')].axes
    assert (out / 'all.png').stat().st_size > 0 and [a.get_title().split('\n')[0] for a in axes[:2]] == \
        ['categorical-K16', 'gaussian']
    acc = plot_latent.knn_accuracy(mu, labels[:n])
    assert f'5-NN accuracy {100 * acc:.1f}%' in axes[0].get_title()


def test_plot_latent_uses_principal_components_beyond_two_dims(mnist_dir, tmp_path):
    run = tmp_path / 'z3'
    train.train(train.parse_args(['--data-dir', mnist_dir, '--out-dir', str(run), '--subset', '256',
                                  '--epochs', '1', '--latent-dim', '3', '--seed', '2']))
    figs = plot_latent.main(['--ckpt', str(run / 'model.pt'), '--n', '200', '--out', str(tmp_path),
                             '--data-dir', mnist_dir, '--n-nll', '0', '--grid', '4'])
    ax = figs[str(tmp_path / 'latent_bernoulli-z3-s2.png')].axes[0]
    assert 'first two principal components' in ax.get_title() and ax.get_xlabel() == 'PC 1 of mu(x)'
    assert sum(len(c.get_offsets()) for c in ax.collections) == 200
    assert 'principal directions' in figs[str(tmp_path / 'manifold_bernoulli-z3-s2.png')].axes[0].get_title()

# -----------------------------------------------------------------------------
# reliability: one owner per run directory, no stale model, one-line errors everywhere


def snapshot(run):
    """Every file of a run directory and its bytes (the lock file aside)."""
    return {p.name: p.read_bytes() for p in sorted(Path(run).iterdir()) if p.name != '.lock'}


@pytest.fixture
def finished_run(reference_run, tmp_path):
    """A copy of the finished 2-epoch reference run, and its files' bytes."""
    import shutil
    run = tmp_path / 'finished'
    shutil.copytree(reference_run, run, ignore=shutil.ignore_patterns('.lock'))
    return run, snapshot(run)


def one_line_failure(r, says):
    """A finished subprocess failed with exactly one line on stderr that says `says`."""
    assert r.returncode != 0 and r.stderr.count('\n') == 1 and says in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr


def patched(patch, script, *args):
    """The command that runs script as __main__ in a fresh python after the code `patch` (a monkeypatch)."""
    code = f'import runpy, sys\n{patch}\nsys.argv = {[script, *args]!r}\nrunpy.run_path({script!r}, run_name="__main__")'
    return [sys.executable, '-c', code]


def with_patch(patch, script, *args):
    return subprocess.run(patched(patch, script, *args), capture_output=True, text=True, timeout=300, cwd=HERE)


def test_a_new_run_never_replaces_a_finished_one_unless_told(finished_run, mnist_dir, tmp_path, monkeypatch):
    """Without --resume a run in a directory holding one is refused; a new run that fails (bad
    data here) leaves it byte-identical; --overwrite deletes model.pt before anything is written,
    so an interrupted overwrite never leaves the old model looking current."""
    import torchvision
    monkeypatch.setattr(torchvision.datasets.MNIST, 'mirrors', ['http://127.0.0.1:9/'])  # offline
    run, before = finished_run
    for extra, says in [([], 'holds a run (model.pt, last.pt, metrics.csv'),
                        (['--data-dir', str(tmp_path / 'nowhere'), '--overwrite'], 'could not load or download MNIST'),
                        (['--overwrite', '--resume'], 'choose one'),
                        (['--resume', '--epochs', '1'], 'is at epoch 2; --epochs 1 would end before it')]:
        with pytest.raises(SystemExit) as e:
            train.train(train.parse_args(['--data-dir', mnist_dir, '--out-dir', str(run), *TINY, *extra]))
        assert says in str(e.value.code) and snapshot(run) == before, e.value.code

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, 'train_epoch', interrupted)
    with pytest.raises(SystemExit) as e:
        train.train(train.parse_args(['--data-dir', mnist_dir, '--out-dir', str(run), *TINY, '--overwrite']))
    assert e.value.code == 130 and not (run / 'model.pt').exists() and not (run / 'metrics.csv').exists()
    assert torch.load(run / 'last.pt', weights_only=True)['epoch'] == 0          # the new run's, not the old one's


def test_a_run_in_a_finished_run_dir_is_refused_in_one_line(finished_run, mnist_dir):
    run, before = finished_run
    r = subprocess.run(train_cmd(run, mnist_dir), capture_output=True, text=True, timeout=300)
    one_line_failure(r, f'--out-dir {run} holds a run (model.pt, last.pt, metrics.csv')
    assert '--resume' in r.stderr and '--overwrite' in r.stderr and snapshot(run) == before


def test_a_second_process_in_the_same_out_dir_is_refused(tmp_path, mnist_dir):
    """Two real processes: while one trains, another with the same --out-dir (and any flags) is
    refused in one line naming the first; the first finishes untouched."""
    import time
    out = tmp_path / 'run'
    p = subprocess.Popen(train_cmd(out, mnist_dir, '--epochs', '100000'), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / 'last.pt').exists():
            assert p.poll() is None and time.time() < deadline
            time.sleep(0.05)
        for extra in ([], ['--resume'], ['--lr', '0.01', '--overwrite']):
            r = subprocess.run(train_cmd(out, mnist_dir, *extra), capture_output=True, text=True, timeout=300)
            one_line_failure(r, f'is in use by train.py (pid {p.pid})')
        assert p.poll() is None                               # the first one is still training
        assert torch.load(out / 'last.pt', weights_only=True)['args']['lr'] == 1e-3
    finally:
        p.kill()
        p.wait()
    assert utils.lock_holder(str(out)) == ''                  # released by the OS with the process

FAILURES = {   # a patch that makes the resumed run fail as a machine would, and what the one line says
    'disk full': ('import errno, utils\nreal = utils.write_atomic\n'
                  'def full(path, write, text=False):\n'
                  '    def half(f):\n'
                  '        f.write("x" * 1000 if text else b"x" * 1000)\n'
                  '        raise OSError(errno.ENOSPC, "No space left on device")\n'
                  '    real(path, half, text)\n'
                  'utils.write_atomic = full', 'error: No space left on device: {run}/metrics.csv'),
    'CUDA out of memory': ('import torch, vae\n'
                           'def oom(*a, **k):\n'
                           '    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")\n'
                           'vae.elbo_terms = oom', 'error: out of memory (CUDA out of memory. Tried to allocate'),
    'CPU out of memory': ('import vae\n'
                          'def oom(*a, **k):\n'
                          '    raise RuntimeError("DefaultCPUAllocator: can\'t allocate memory: you tried to allocate 1 GB")\n'
                          'vae.elbo_terms = oom', "error: out of memory (DefaultCPUAllocator: can't allocate memory"),
}


@pytest.mark.parametrize('case', list(FAILURES))
def test_a_failing_machine_gives_one_line_and_keeps_the_finished_run(finished_run, mnist_dir, case):
    """A finished run continued with --resume on a disk that fills up halfway through every file,
    or out of memory: one line, exit 1, the run's files byte-identical, no temporary file left."""
    run, before = finished_run
    patch, says = FAILURES[case]
    r = with_patch(patch, 'train.py', '--data-dir', mnist_dir, '--out-dir', str(run), *TINY, '--epochs', '3',
                   '--resume')
    one_line_failure(r, says.format(run=run))
    assert r.returncode == 1 and snapshot(run) == before


@pytest.mark.parametrize('script,args', [
    ('compare_likelihoods.py', ['{run}', '--out', '{out}']),
    ('plot_latent.py', ['--ckpt', '{run}', '--out', '{out}']),
    ('plot_latent.py', ['--ckpt', '{run}', '--all', '{out}/all.png']),
    ('bench.py', ['--out', '{out}/bench.csv', '--dists', 'bernoulli']),
])
def test_an_unwritable_output_is_refused_before_the_long_work(reference_run, tmp_path, mnist_dir, script, args):
    out = '/sys/results' if os.geteuid() == 0 else str(tmp_path / 'readonly' / 'results')   # root ignores permissions
    if os.geteuid() != 0:
        (tmp_path / 'readonly').mkdir(mode=0o500)
    r = subprocess.run([sys.executable, script, *[a.format(run=reference_run, out=out) for a in args],
                        '--data-dir', mnist_dir], capture_output=True, text=True, timeout=120, cwd=HERE)
    one_line_failure(r, 'cannot write there')
    assert 'evaluated' not in r.stdout and 'wrote' not in r.stdout


def test_an_interrupted_run_ignores_signals_through_its_exit(tmp_path):
    """After an interrupt, the exit ignores Ctrl-C and SIGTERM to the end: an exit handler that runs
    after utils' (atexit runs the last registered first) sees both ignored, which Python's
    finalisation keeps, where it would reset a handler of its own to the default."""
    script = tmp_path / 'run.py'
    script.write_text(f'''import atexit, os, signal, sys, time
sys.path.insert(0, {HERE!r})
import utils
atexit.register(lambda: print([signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)]))
signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal, not behind `cmd &`
utils.one_line_errors()
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
except KeyboardInterrupt:
    sys.exit(130)
''')
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stdout.strip() == '[True, True]', (r.returncode, r.stdout, r.stderr)


@pytest.mark.parametrize('delay', [0.5, 1.2, 3.0])
def test_ctrl_c_twice_at_any_moment_is_one_line(tmp_path, mnist_dir, delay):
    """Ctrl-C twice in a row during the imports (0.3 s), then later (data loading, set-up or the
    first epoch, depending on the machine): exit status 130, no traceback, one line (or the
    training loop's resume hint), and no model.pt."""
    import signal
    import time
    p = subprocess.Popen(train_cmd(tmp_path / 'run', mnist_dir, '--epochs', '100000'), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    time.sleep(0.02)
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and 'Traceback' not in err and not (tmp_path / 'run' / 'model.pt').exists(), err
    assert len(err.strip().splitlines()) <= 3, err    # 'interrupted', or the loop's resume hint


def compare_err(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cmp.main(argv)
    out = capsys.readouterr().out
    assert 'evaluated in' not in out, out          # refused before any run was evaluated
    return str(e.value.code)


def test_compare_checks_every_run_before_evaluating_any(tiny_runs, tmp_path, mnist_dir, capsys):
    import shutil
    flags = ['--data-dir', mnist_dir, '--out', str(tmp_path / 'res'), '--k', '2', '--n-test', '8', '--n-curve', '1']
    copies = {}
    for name in ('no-metrics', 'garbage-metrics', 'short-metrics', 'bad-model'):
        copies[name] = tmp_path / name
        shutil.copytree(tiny_runs[1], copies[name], ignore=shutil.ignore_patterns('.lock'))
    (copies['no-metrics'] / 'metrics.csv').unlink()
    (copies['garbage-metrics'] / 'metrics.csv').write_text('hello,world\n1,2\n')
    (copies['short-metrics'] / 'metrics.csv').write_text('epoch,seconds\n')
    (copies['bad-model'] / 'model.pt').write_text('not a checkpoint\n')
    cases = {'no-metrics': 'cannot read', 'garbage-metrics': 'is not a metrics.csv written by train.py',
             'short-metrics': 'holds 0 valid epochs of the 1', 'bad-model': 'not a readable PyTorch file'}
    for name, says in cases.items():     # the bad run last: found before the good one is evaluated
        msg = compare_err(capsys, [tiny_runs[0], str(copies[name]), *flags])
        assert msg.startswith('error: ') and str(copies[name]) in msg and says in msg and '\n' not in msg, msg
    msg = compare_err(capsys, [tiny_runs[0], tiny_runs[0] + '/', *flags])
    assert 'is named twice' in msg
    shutil.copytree(tiny_runs[0], tmp_path / 'copy', ignore=shutil.ignore_patterns('.lock'))
    msg = compare_err(capsys, [tiny_runs[0], str(tmp_path / 'copy'), *flags])
    assert 'hold the same model (categorical-K16, latent dim 2, seed 0)' in msg and 'two seeds' in msg
    assert not (tmp_path / 'res').exists()


def test_a_directory_where_an_output_file_goes_is_refused_before_evaluating(reference_run, tmp_path, mnist_dir,
                                                                           capsys):
    (tmp_path / 'res' / 'likelihoods.csv').mkdir(parents=True)
    msg = compare_err(capsys, [str(reference_run), '--data-dir', mnist_dir, '--out', str(tmp_path / 'res'),
                               '--k', '2', '--n-test', '8', '--n-curve', '1'])
    assert msg.startswith('error: --out: ') and 'likelihoods.csv is a directory, where the output file goes' in msg


def test_plot_latent_draws_a_one_dimensional_latent(tmp_path, mnist_dir):
    run = tmp_path / 'z1'
    train.train(train.parse_args(['--data-dir', mnist_dir, '--out-dir', str(run), '--subset', '256',
                                  '--epochs', '1', '--latent-dim', '1']))
    figs = plot_latent.main(['--ckpt', str(run), '--n', '200', '--out', str(tmp_path), '--data-dir', mnist_dir,
                             '--n-nll', '20', '--k', '2', '--grid', '6'])
    ax = figs[str(tmp_path / 'latent_bernoulli-z1.png')].axes[0]
    assert 'latent dim 1: mu(x) against the digit' in ax.get_title() and ax.get_ylabel() == 'digit (jittered)'
    points = torch.tensor([xy for c in ax.collections for xy in c.get_offsets().tolist()])
    assert len(points) == 200 and (points[:, 1] - points[:, 1].round()).abs().max() <= 0.3
    img = figs[str(tmp_path / 'manifold_bernoulli-z1.png')].axes[0].get_images()[0].get_array()
    assert img.shape == (28, 6 * 28)                                   # one row of 6 decoder means
    figs = plot_latent.main(['--ckpt', str(run), '--n', '200', '--all', str(tmp_path / 'all.png'),
                             '--data-dir', mnist_dir])
    assert '1-D: mu vs digit' in figs[str(tmp_path / 'all.png')].axes[0].get_title()

# -----------------------------------------------------------------------------
# the Makefile


FAKE_PYTHON = """#!/bin/sh
echo "$@" >> calls.txt
case "$1" in
  train.py|quality.py) while [ $# -gt 0 ]; do [ "$1" = --out-dir ] && mkdir -p "$2" && touch "$2/model.pt"; shift; done ;;
  plot_latent.py) mkdir -p results && touch results/latent_beta.png results/manifold_beta.png ;;
esac
"""


def makefile_sandbox(tmp_path):
    """The Makefile and the files it depends on, an installed-looking .venv, and ./fakepy."""
    import shutil
    for f in ['Makefile', 'train.py', 'vae.py', 'distributions.py', 'rundir.py', 'utils.py', 'plot_latent.py',
              'compare_likelihoods.py', 'quality.py', 'requirements.txt']:
        shutil.copy(os.path.join(HERE, f), tmp_path)
    (tmp_path / '.venv').mkdir()
    (tmp_path / '.venv' / '.installed').touch()
    (tmp_path / 'fakepy').write_text(FAKE_PYTHON)
    (tmp_path / 'fakepy').chmod(0o755)


def test_make_latent_trains_then_plots_and_keeps_the_model(tmp_path):
    """The Makefile's own logic, with a stand-in for python that creates what the scripts would:
    make latent trains, then plots; a second make does nothing; and the model survives. With DISTS
    not naming DIST, the model is reached only through pattern rules, and without .PRECIOUS make
    deleted it afterwards as an intermediate file."""
    makefile_sandbox(tmp_path)
    make = ['make', 'latent', 'DATA=d', 'DIST=beta', 'DISTS=bernoulli', 'PY=./fakepy']
    r = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / 'calls.txt').read_text().splitlines()
    assert len(calls) == 2 and calls[0].startswith('train.py --dist beta --latent-dim 2 --seed 0 --epochs 20')
    assert calls[1] == 'plot_latent.py --ckpt runs/beta-z2-s0/model.pt --data-dir d --out results'
    assert (tmp_path / 'runs' / 'beta-z2-s0' / 'model.pt').exists() and 'rm ' not in r.stdout
    subprocess.run(make, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert len((tmp_path / 'calls.txt').read_text().splitlines()) == 2      # up to date: nothing redone


def test_make_resumes_an_interrupted_run_and_restarts_a_stale_one(tmp_path):
    """A run with last.pt and no model.pt was interrupted: make passes --resume. A finished run
    whose model.pt is older than train.py is trained again from the start."""
    import time
    makefile_sandbox(tmp_path)
    run = tmp_path / 'runs' / 'compare' / 'beta-z32-s0'
    run.mkdir(parents=True)
    (run / 'last.pt').touch()
    make = ['make', 'runs/compare/beta-z32-s0/model.pt', 'DATA=d', 'PY=./fakepy']
    assert subprocess.run(make, cwd=tmp_path, capture_output=True, timeout=60).returncode == 0
    time.sleep(1.1)
    (tmp_path / 'train.py').touch()                                   # the code changed
    assert subprocess.run(make, cwd=tmp_path, capture_output=True, timeout=60).returncode == 0
    calls = (tmp_path / 'calls.txt').read_text().splitlines()
    assert len(calls) == 2 and calls[0].endswith('--resume') and calls[1].endswith('--overwrite')


def test_make_compare_budget_is_the_default_or_long(tmp_path):
    """make compare trains with at most 20 epochs and patience 3; BUDGET=long with 200 and 10,
    in its own runs and results directories."""
    makefile_sandbox(tmp_path)
    for extra, run, budget, results in [([], 'runs/compare', '--epochs 20 --patience 3', 'results'),
                                        (['BUDGET=long'], 'runs/long', '--epochs 200 --patience 10', 'results/long')]:
        (tmp_path / 'calls.txt').unlink(missing_ok=True)
        make = ['make', 'compare', 'DATA=d', 'DISTS=beta', 'PY=./fakepy'] + extra
        subprocess.run(make, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        calls = (tmp_path / 'calls.txt').read_text().splitlines()
        assert calls[0].startswith(f'train.py --dist beta --latent-dim 32 --seed 0 {budget} --data-dir d '
                                   f'--out-dir {run}/beta-z32-s0')
        judged = calls[1] == 'quality.py --data-dir d --out-dir runs/classifier/'   # the judge: once, for both
        assert judged == (not extra)
        assert calls[1 + judged].startswith(f'compare_likelihoods.py {run}/beta-z32-s0 --data-dir d --out {results} ')
        assert calls[1 + judged].endswith(' --classifier runs/classifier/model.pt')
        assert '--compare-plan 1 100 10000 1000' in calls[0]        # the first run estimates the whole


def test_make_figures_copies_the_chosen_comparison_and_the_latent_figures(tmp_path):
    makefile_sandbox(tmp_path)
    for d in ('results/quick', 'results'):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    (tmp_path / 'results/quick/likelihoods.png').write_text('quick')
    (tmp_path / 'results/likelihoods.png').write_text('default budget')
    (tmp_path / 'results/latent_all.png').write_text('latent')
    r = subprocess.run(['make', 'figures', 'QUICK=1'], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    figs = tmp_path / 'docs' / 'figures'
    assert (figs / 'likelihoods.png').read_text() == 'quick' and (figs / 'latent_all.png').read_text() == 'latent'
    assert 'results/quick/samples.png is missing' in r.stderr and not (figs / 'samples.png').exists()


def test_make_recipes_trains_each_fit_at_the_compare_budget_and_refuses_a_misspelt_fit(tmp_path):
    makefile_sandbox(tmp_path)
    make = ['make', 'recipes', 'DATA=d', 'RECIPES=gaussian:gray beta:dequantised', 'QUICK=1', 'PY=./fakepy']
    r = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / 'calls.txt').read_text().splitlines()
    runs = ['runs/quick/beta-z32-s0', 'runs/quick/gaussian-z32-s0', 'runs/quick/gray/gaussian-z32-s0',
            'runs/quick/dequantised/beta-z32-s0']
    trains = {c.split('--out-dir ')[1].split()[0]: c for c in calls if c.startswith('train.py')}
    assert sorted(trains) == sorted(runs)
    for run, c in trains.items():
        fit = run.split('/')[2] if run.count('/') == 3 else None
        assert ' --epochs 2 --patience 0 ' in c and (f'--fit {fit}' in c if fit else '--fit' not in c), c
    assert calls[-1].startswith(f"compare_likelihoods.py {' '.join(runs)} --data-dir d --out results/quick/recipes ")
    for bad in (['train', 'FIT=grey'], ['recipes', 'RECIPES=gaussian:grey']):
        r = subprocess.run(['make', *bad, 'DATA=d', 'PY=./fakepy'], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0 and 'grey: one of discrete, dequantised, gray' in r.stderr, r.stderr

# -----------------------------------------------------------------------------
# bench.py


def test_reference_loop_reads_the_same_images(mnist_dir):
    import bench
    data = utils.load_mnist(mnist_dir)
    x, y = next(iter(bench.reference_loader(mnist_dir, False)))     # the test set, in order
    assert x.dtype == torch.float32 and x.shape == (256, 1, 28, 28)
    assert torch.equal(bench.to_8bit(x), data['test'][0][:256]) and torch.equal(y, data['test'][1][:256])
    ds = bench.reference_loader(mnist_dir, True, n=50000).dataset
    assert len(ds) == 50000
    for i in (0, 31337, 49999):
        assert torch.equal(bench.to_8bit(ds[i][0]), data['train'][0][i])


def test_bench_tiny_run_writes_consistent_rows(mnist_dir, tmp_path):
    """Both loops, each likelihood in its own process, as make bench runs it."""
    import bench
    bench.main(BENCH_TINY + ['--data-dir', mnist_dir, '--subset', '512', '--epochs', '2', '--precisions', 'fp32',
                             '--out', str(tmp_path / 'both.csv')])
    rows = bench_rows(tmp_path / 'both.csv', 512)
    assert [(r['dist'], r['precision'], r['loop']) for r in rows] == [('bernoulli', 'fp32', 'train.py'),
                                                                      ('bernoulli', 'fp32', 'reference')]
