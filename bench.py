"""Benchmark: how close training and evaluation come to what this machine allows.

    python bench.py --data-dir ../shared/mnist            (make bench DATA=../shared/mnist)

For each likelihood (default bernoulli and categorical with 256 bins) at the default
architecture and batch size, on --device, each in a fresh process (so its peak memory is
its own), and for two training loops:
- "train.py": train.py's own train_epoch: all training images as one uint8 tensor on the
  device, batches indexed out of it and binarised/dequantised on the fly;
- "reference": the loop most tutorials write: a DataLoader over the torchvision dataset
  with transforms.ToTensor(), batch 256, shuffled, in the main process.
it measures
1. ceiling: images/s of train.py's train_step (forward, backward, Adam step) repeated on
   one batch already in memory, timed in runs of --steps steps before the first epoch and
   after every epoch: the median of all runs;
2. epoch: images/s over one full epoch of the loop on the 50,000 training images (data
   pipeline, binarisation or dequantisation, logging; validation excluded): the median of
   --epochs epochs, the two loops taking turns;
3. ratio: each epoch's images/s over the mean ceiling of the runs just before and after it
   (the speed of a shared machine drifts by 10 % or more from minute to minute; pairing
   neighbours in time takes most of the drift out), the median over epochs; and, as a check that needs no second timing,
   data s: the seconds one epoch of the loop's data pipeline takes alone (no model);
4. eval: images x k per second of the importance-sampled log p(x) of compare_likelihoods.py
   (k = --k draws per image, on the first --eval-n test images, fed the way the loop feeds
   its training images; the mean of two runs);
5. peak resident memory of the likelihood's process (and peak CUDA memory on a GPU);
6. the hardware limit: the training FLOPs per image (torch.utils.flop_counter on one
   train_step: forward, backward, the likelihood included), the GFLOP/s the epoch reaches,
   and the machine's GEMM peak: a 2048 x 2048 matmul in the same precision and thread count,
   timed in the same process (the best of five); fraction = epoch GFLOP/s / peak.
Each precision of --precisions is measured (the networks under autocast for bf16, as
train.py --precision bf16 trains); by default fp32, and bf16 only where the device has it in
hardware (emulated bf16 is slower than fp32; --precisions bf16 forces it). The reference loop,
which compares data pipelines, runs in fp32.
Prints a table and writes --out (default results/bench.csv) with the device, torch version
and thread count. Timings are wall-clock: run it on an otherwise idle machine.
"""
import utils
if __name__ in ('__main__', '__mp_main__'):   # the benchmark's own child process too
    utils.one_line_errors()   # first: from here on Ctrl-C, a full disk or OOM is one line, not a traceback

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import train  # noqa: E402  (to time its real loop)
import vae  # noqa: E402
from utils import number  # noqa: E402

COLUMNS = ['dist', 'precision', 'loop', 'ceiling_img_s', 'epoch_img_s', 'ratio', 'epoch_seconds', 'data_seconds', 'eval_img_k_s',
           'eval_k', 'eval_n', 'train_mflop_img', 'epoch_gflop_s', 'peak_gflop_s', 'fraction',
           'peak_rss_mb', 'peak_cuda_mb', 'device', 'threads', 'torch', 'compile']
TABLE = ['dist', 'precision', 'loop', 'ceiling_img_s', 'epoch_img_s', 'ratio', 'epoch_seconds', 'data_seconds',
         'eval_img_k_s', 'train_mflop_img', 'epoch_gflop_s', 'peak_gflop_s', 'fraction', 'peak_rss_mb']
LOOPS = ('train.py', 'reference')

# -----------------------------------------------------------------------------
# timing


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def seconds(fn, device):
    """Wall-clock seconds of fn(), with the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def train_flops(model, opt, x, targs, dtype):
    """FLOPs of one train_step on the batch x, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        train.train_step(model, opt, x, targs, dtype=dtype)
    return counter.get_total_flops()


def gemm_peak(device, dtype, n=2048, repeats=5):
    """GFLOP/s of an n x n matmul in dtype (fp32 for None) on device: the best of repeats."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype or torch.float32) for _ in range(2))
    a @ b                                                 # warm-up
    best = min(seconds(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def reference_loader(root, train_split, batch_size=256, n=50000):
    """What tutorials do: the torchvision dataset, ToTensor() per image, a shuffled DataLoader.
    The same n training images / the test images as utils.load_mnist."""
    from torchvision import datasets, transforms
    ds = datasets.MNIST(root, train=train_split, download=True, transform=transforms.ToTensor())
    if train_split:
        ds = torch.utils.data.Subset(ds, range(n))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=train_split)


def to_8bit(x):
    """ToTensor's floats in [0, 1] back to the uint8 levels every likelihood's data() takes."""
    return (x * 255).round().to(torch.uint8)


def reference_batches(lik, loader, gen, device):
    """The tutorial-style data pipeline: batches built image by image by the DataLoader,
    turned into the likelihood's data."""
    for x, _ in loader:                                   # (B, 1, 28, 28) float in [0, 1]
        yield lik.data(to_8bit(x).to(device), gen)


def reference_epoch(model, opt, loader, targs, gen, device, dtype=None):
    """The tutorial-style training epoch, with the same step and logging as train_epoch."""
    model.train()
    for x in reference_batches(model.lik, loader, gen, device):
        loss, elbo = train.train_step(model, opt, x, targs, dtype=dtype)
        loss.item(), elbo.sum().item()


def reference_eval(model, loader, n, k):
    """Importance-sampled log p(x) of the first n test images, batch by batch from the loader."""
    done = 0
    device = next(model.parameters()).device
    for x, _ in loader:
        x = vae.eval_data(model.lik, to_8bit(x[:n - done])).to(device)
        vae.importance_log_px(model, x, k)
        done += x.shape[0]
        if done >= n:
            return


# -----------------------------------------------------------------------------
# one likelihood, in its own process


def measure(dist, precision, args):
    """The six measurements for one likelihood in one precision: a row of COLUMNS per loop.
    Both loops run in this one process (peak memory is the process's); the evaluations of
    the two loops alternate (the mean of two each)."""
    torch.manual_seed(0)
    device = utils.pick_device(args.device)
    utils.keep_freed_memory()             # as train.py
    dtype = vae.PRECISIONS[precision]
    loops = args.loops if dtype is None else [loop for loop in args.loops if loop == 'train.py']
    model = vae.build({'dist': dist, 'latent_dim': 32}).to(device)
    lik = model.lik
    targs = train.parse_args(['--dist', dist, '--batch-size', str(args.batch_size)])   # train.py's defaults
    if args.compile:                                      # compiled on the warm-up steps, not timed
        model.forward = torch.compile(model.forward, dynamic=False)  # dynamic shapes fail on randn
    opt = train.optimizer(model, 1e-3)
    gen = torch.Generator(device).manual_seed(0)
    data = utils.load_mnist(args.data_dir)
    train_x8 = data['train'][0][:args.subset].to(device)  # (N, 1, 28, 28) uint8
    n = train_x8.shape[0]
    test_x = vae.eval_data(lik, data['test'][0][:args.eval_n]).to(device)
    loader, test_loader = ((reference_loader(args.data_dir, True, args.batch_size, n),
                            reference_loader(args.data_dir, False)) if 'reference' in loops else (None, None))
    epoch = {'train.py': lambda: train.train_epoch(model, opt, train_x8, gen, targs, dtype=dtype),
             'reference': lambda: reference_epoch(model, opt, loader, targs, gen, device, dtype)}
    pipeline = {'train.py': lambda: sum(1 for _ in train.batches(lik, train_x8, gen, args.batch_size)),
                'reference': lambda: sum(1 for _ in reference_batches(lik, loader, gen, device))}
    evaluate = {'train.py': lambda: vae.importance_log_px(model, test_x, args.k),
                'reference': lambda: reference_eval(model, test_loader, args.eval_n, args.k)}

    x = lik.data(train_x8[:args.batch_size], gen)         # one batch, already in memory
    step = lambda: seconds(lambda: [train.train_step(model, opt, x, targs, dtype=dtype)  # noqa
                                    for _ in range(args.steps)], device)
    step()                                                # warm-up (and compilation, with --compile)
    flop_img = train_flops(model, opt, x, targs, dtype) / x.shape[0]
    peak = gemm_peak(device, dtype)
    ceiling_s, ratios = [step()], {loop: [] for loop in loops}
    epoch_s, eval_s = ({loop: [] for loop in loops} for _ in range(2))
    for i in range(args.epochs):                          # ceiling, epoch, ceiling, epoch, ..., ceiling
        for loop in loops:
            print(f'bench: {dist} ({precision}), epoch {i + 1}/{args.epochs} of the {loop} loop ...', flush=True)
            epoch_s[loop].append(seconds(epoch[loop], device))
            ceiling_s.append(step())                      # each epoch against the ceiling either side
            ratios[loop].append(statistics.mean(ceiling_s[-2:]) / epoch_s[loop][-1] * n / (args.steps * args.batch_size))
    data_s = {loop: seconds(pipeline[loop], device) for loop in loops}
    for _ in range(2):
        for loop in loops:
            eval_s[loop].append(seconds(evaluate[loop], device))
    ceiling = args.steps * args.batch_size / statistics.median(ceiling_s)
    common = {'dist': dist, 'precision': precision, 'ceiling_img_s': ceiling, 'eval_k': args.k,
              'eval_n': args.eval_n, 'train_mflop_img': flop_img / 1e6, 'peak_gflop_s': peak,
              'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # KiB on Linux
              'peak_cuda_mb': round(torch.cuda.max_memory_allocated() / 2**20) if device.type == 'cuda' else '',
              'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else
              f'{device.type}: {cpu_name()}, {os.cpu_count()} cores',
              'threads': torch.get_num_threads(), 'torch': torch.__version__, 'compile': args.compile}
    # unrounded: the CSV keeps 6 significant digits, so every derived column agrees with its parts
    rate = {loop: n / statistics.median(epoch_s[loop]) for loop in loops}
    return [{**common, 'loop': loop, 'epoch_img_s': rate[loop],
             'epoch_gflop_s': rate[loop] * flop_img / 1e9, 'fraction': rate[loop] * flop_img / 1e9 / peak,
             'ratio': statistics.median(ratios[loop]), 'epoch_seconds': statistics.median(epoch_s[loop]),
             'data_seconds': data_s[loop], 'eval_img_k_s': args.eval_n * args.k / statistics.mean(eval_s[loop])}
            for loop in loops]


def in_fresh_process(*a):
    ctx = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        try:
            return ex.submit(measure, *a).result()
        except concurrent.futures.process.BrokenProcessPool:
            raise SystemExit('error: the benchmark process died (killed, or out of memory)') from None


# -----------------------------------------------------------------------------
# main


def cell(v):
    """A table cell: floats to three significant digits (whole numbers from 100 up)."""
    if not isinstance(v, float):
        return str(v)
    return f'{v:,.0f}' if abs(v) >= 100 else f'{v:.3g}'


def parse_args(argv=None):
    p = utils.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dists', nargs='+', default=['bernoulli', 'categorical'], choices=list(vae.LIKELIHOODS))
    p.add_argument('--loops', nargs='+', default=list(LOOPS), choices=LOOPS)
    p.add_argument('--precisions', nargs='+', default=None, choices=list(vae.PRECISIONS),
                   help='training precisions to measure (the reference loop: fp32 only); default fp32, and bf16 '
                        'where the device has bf16 in hardware (as train.py --precision auto)')
    p.add_argument('--device', default='auto', choices=utils.DEVICES)
    p.add_argument('--data-dir', default='data', help='holds MNIST/raw/')
    p.add_argument('--batch-size', type=number(int, 1, 50000), default=256)
    p.add_argument('--steps', type=number(int, 1, 10000), default=30, help='ceiling: steps per timed run')
    p.add_argument('--epochs', type=number(int, 1, 1000), default=2, help='epochs of each loop (median kept)')
    p.add_argument('--k', type=number(int, 1, 100000), default=100, help='eval: importance samples per image')
    p.add_argument('--eval-n', type=number(int, 1, 10000), default=500, help='eval: test images')
    p.add_argument('--compile', action='store_true',
                   help="torch.compile the model's forward for training (an experiment: slower on a 2-core CPU)")
    p.add_argument('--subset', type=number(int, 1, 50000), default=50000,
                   help='epoch: the first N training images (a quick check, not a benchmark)')
    p.add_argument('--out', default='results/bench.csv')
    args = p.parse_args(argv)
    if 'train.py' not in args.loops and args.precisions is not None and 'fp32' not in args.precisions:
        p.error('the reference loop runs in fp32 only: add --precisions fp32 or --loops train.py')
    return args


def main(argv=None):
    args = parse_args(argv)
    device = utils.pick_device(args.device)               # a missing device fails here, once
    if args.precisions is None:
        args.precisions = ['fp32'] + ['bf16'] * utils.native_bf16(device)
        if 'bf16' not in args.precisions:
            print(f'bench: bf16 skipped: {device.type} has no bf16 in hardware (emulated, it is slower than fp32); '
                  f'--precisions bf16 measures it anyway', flush=True)
    utils.or_exit(utils.load_mnist, args.data_dir, errors=utils.DataError)
    utils.writable_dir(os.path.dirname(args.out) or '.', '--out', [os.path.basename(args.out)])
    rows = []
    for dist in args.dists:
        for precision in args.precisions:
            print(f'bench: {dist} ({precision}): the ceiling around {args.epochs} epoch(s) of each loop, '
                  f'then the evaluations ...', flush=True)
            rows += in_fresh_process(dist, precision, args)
    utils.write_csv(rows, args.out, COLUMNS)

    r = rows[0]
    print(f"\n{r['device']}, {r['threads']} threads, torch {r['torch']}{', torch.compile' * args.compile}; "
          f"eval: k = {args.k} on {args.eval_n} images")
    head = ['likelihood', 'precision', 'loop', 'ceiling img/s', 'epoch img/s', 'ratio', 'epoch s',
            'data pipeline s', 'eval img*k/s', 'train MFLOP/img', 'epoch GFLOP/s', 'GEMM peak GFLOP/s',
            'fraction of peak', 'peak RSS MB']
    for cells in [head, ['---'] * len(head)] + [[r[c] for c in TABLE] for r in rows]:   # a Markdown table
        print('| ' + ' | '.join(cell(c) for c in cells) + ' |')
    rate = {(r['dist'], r['precision']): r['epoch_img_s'] for r in rows if r['loop'] == 'train.py'}
    first = args.dists[0], args.precisions[0]
    for key in list(rate)[1:]:
        print(f"{' '.join(key)} / {' '.join(first)} training images/s: {rate[key] / rate[first]:.2f}")
    print(f'wrote {args.out}')
    return rows


if __name__ == '__main__':
    main()
