"""Shared test fixtures. Two tiers: `make test-fast` runs the tests not marked slow, on small
synthetic uint8 images (numerics, shapes, every likelihood's contract, the command lines);
`make test` runs all, the slow ones on real MNIST from $MNIST_DATA (end-to-end runs, resume,
signals, the Makefile, the bench, torch.compile)."""
import os

import pytest
import torch

import distributions as D
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
    import utils
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
    if not all(os.path.exists(os.path.join(root, 'MNIST', 'raw', f)) for f in vae.MNIST_FILES):
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
    """vae.load_mnist patched to return synthetic images (512 train, 100 val, 100 test, labels 0-9);
    returns a data directory to pass, which holds nothing."""
    def load(root):
        if not os.path.isdir(root):
            raise vae.DataError(f'could not load or download MNIST; put the four files into {root}/MNIST/raw/')
        sets = {'train': 512, 'val': 100, 'test': 100}
        return {k: (synthetic_images(n, i), torch.arange(n) % 10) for i, (k, n) in enumerate(sets.items())}
    monkeypatch.setattr(vae, 'load_mnist', load)
    data = tmp_path / 'synthetic'
    data.mkdir()
    return str(data)
