"""Shared test fixtures and helpers. Two files: test_vae.py, fast, on small synthetic uint8 images
(numerics, shapes, every likelihood's contract, the command lines: `make test-fast`), and
test_runs.py, slow, on real MNIST from $MNIST_DATA (end-to-end runs, resume, signals, the
Makefile, the bench, torch.compile). `make test` runs both. A test that needs MNIST is marked
slow wherever it is."""
import csv
import os

import pytest
import torch

import distributions as D
import utils
import vae


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: real MNIST, subprocesses or compiling (make test, not make test-fast)')


def pytest_collection_modifyitems(items):
    """Every test that needs real MNIST (directly or through a fixture) is slow."""
    for item in items:
        if 'mnist_dir' in getattr(item, 'fixturenames', ()):
            item.add_marker('slow')


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    """--device auto means the CPU in every test, on a machine with a GPU too (its runs must match
    bit for bit, and the CPU's code paths are the ones tested); subprocesses see no GPU."""
    pick = utils.pick_device
    monkeypatch.setattr(utils, 'pick_device', lambda name: pick('cpu' if name == 'auto' else name))
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')


@pytest.fixture(autouse=True)
def eager_beta(monkeypatch):
    """Beta scores on its eager path, which the compiled passes equal (tested): compiling them
    takes minutes on a cold cache. Each test starts as if nothing had failed to compile."""
    for name in ('_first_fused', '_bins_fused', '_cf_fused', '_first_grad_fused', '_bins_grad_fused'):
        monkeypatch.setattr(D, name, D.Fused(None))
    monkeypatch.setattr(D.Fused, 'fell_back', '')


@pytest.fixture(scope='session')
def mnist_dir():
    root = os.environ.get('MNIST_DATA', 'data')
    if not all(os.path.exists(os.path.join(root, 'MNIST', 'raw', f)) for f in utils.MNIST_FILES):
        msg = f'MNIST not found in {root}/MNIST/raw (run `make test DATA=<dir holding MNIST/raw>`)'
        if os.environ.get('CI') == 'true':
            pytest.fail(msg)
        pytest.skip(msg)
    return root


def synthetic_images(n, seed):
    """n uint8 digit-like images (n, 1, 28, 28): a black background, as in MNIST, and a bright
    stroke of random width and gray edges somewhere in the middle."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.arange(28).view(28, 1).float(), torch.arange(28).view(1, 28).float()
    centre = 8 + 12 * torch.rand(n, 2, generator=g)
    angle = torch.rand(n, generator=g) * 3.1416
    width = 1 + 2 * torch.rand(n, generator=g)
    dist = ((rows - centre[:, 0, None, None]) * angle.cos()[:, None, None]
            - (cols - centre[:, 1, None, None]) * angle.sin()[:, None, None]).abs()
    length = ((rows - centre[:, 0, None, None]) ** 2 + (cols - centre[:, 1, None, None]) ** 2).sqrt()
    ink = ((width[:, None, None] - dist).clamp(0, 1) * (length < 9)).clamp(0, 1)
    return (ink * 255).round().to(torch.uint8).unsqueeze(1)


@pytest.fixture
def synthetic_mnist(monkeypatch, tmp_path):
    """utils.load_mnist patched to return synthetic images (512 train, 100 val, 100 test, labels 0-9);
    returns a data directory to pass, which holds nothing."""
    def load(root):
        if not os.path.isdir(root):
            raise utils.DataError(f'could not load or download MNIST; put the four files into {root}/MNIST/raw/')
        sets = {'train': 512, 'val': 100, 'test': 100}
        return {k: (synthetic_images(n, i), torch.arange(n) % 10) for i, (k, n) in enumerate(sets.items())}
    monkeypatch.setattr(utils, 'load_mnist', load)
    data = tmp_path / 'synthetic'
    data.mkdir()
    return str(data)


# -----------------------------------------------------------------------------
# helpers both test files use


HERE = os.path.dirname(os.path.abspath(__file__))


def lik_of(dist, **opts):
    torch.manual_seed(0)
    return vae.make_likelihood(dist, **opts)


def random_x8(*shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def beta_head_features(n=6, seed=0):
    """Decoder features for the beta head below: concentrations from 1e-3 to 1e4 and every
    8-bit value, a quarter of the pixels at 0 as in MNIST's background, so that every compiled
    pass and the eager fallback are taken."""
    g = torch.Generator().manual_seed(seed)
    lik = lik_of('beta')
    with torch.no_grad():
        lik.head.weight.copy_(torch.randn(2, vae.VAE.features, generator=g) * 3)
    x8 = random_x8(n, 1, 28, 28, seed=seed)
    x8[torch.rand(x8.shape, generator=g) < 0.25] = 0
    return lik, torch.randn(2, n, 28, 28, vae.VAE.features, generator=g), x8


def beta_bins_of(lik, h, x8):
    """Flat float64 a, b, lo, hi (N,): the Beta and the bin of every pixel, as BetaLik scores them."""
    params = lik.params(h).detach().double()                                        # (2, n, 28, 28, 2)
    a, b = (vae.positive(vae.pixel(params[..., j]), lik.floor) for j in (0, 1))   # (2, n, 1, 28, 28)
    lo, hi = vae.bin_edges(x8)
    return tuple(t.reshape(-1) for t in torch.broadcast_tensors(a, b, lo, hi.clamp(max=1)))


def metric_values(run):
    """metrics.csv as written, without the wall-time columns."""
    return [{k: v for k, v in r.items() if k not in ('seconds', 'eval_seconds')}
            for r in csv.DictReader(open(run / 'metrics.csv'))]


BENCH_TINY = ['--dists', 'bernoulli', '--steps', '2', '--eval-n', '3', '--k', '5', '--device', 'cpu']


def bench_rows(path, n):
    """bench.csv's rows, each checked to agree with itself to the CSV's 6 significant digits."""
    rows = list(csv.DictReader(open(path)))
    for r in rows:
        f = {k: float(r[k]) for k in ('ceiling_img_s', 'epoch_img_s', 'ratio', 'epoch_seconds', 'eval_img_k_s',
                                      'train_mflop_img', 'epoch_gflop_s', 'peak_gflop_s', 'fraction')}
        # FLOPs per image: at least the decoder's two 4x4 transposed convolutions (7x7x64 -> 14x14x32 ->
        # 28x28x16), 2 FLOPs per multiply-add, forward and two backward products
        assert 3 * 2 * (7 * 7 * 64 * 32 * 16 + 14 * 14 * 32 * 16 * 16) / 1e6 < f['train_mflop_img'] < 200
        assert f['epoch_gflop_s'] == pytest.approx(f['epoch_img_s'] * f['train_mflop_img'] / 1e3, rel=1e-4)
        assert f['fraction'] == pytest.approx(f['epoch_gflop_s'] / f['peak_gflop_s'], rel=1e-4)
        assert f['epoch_img_s'] == pytest.approx(n / f['epoch_seconds'], rel=1e-4)
        assert all(v > 0 for v in f.values()) and 0 <= float(r['data_seconds'])
        assert r['eval_k'] == '5' and r['eval_n'] == '3' and r['torch'] == torch.__version__
        assert r['device'].startswith('cpu') and int(r['threads']) >= 1 and int(r['peak_rss_mb']) > 100
    return rows


def untrained_judge(path):
    """A classifier checkpoint as quality.py writes one, untrained: for the sample-quality columns'
    plumbing, not their values."""
    import quality
    torch.manual_seed(0)
    torch.save({'format': quality.CLF_FORMAT, 'state_dict': quality.Classifier().state_dict(), 'epoch': 0,
                'val_accuracy': 0.1, 'test_accuracy': 0.1, 'args': {}, 'torch': str(torch.__version__)}, path)
    return str(path)
