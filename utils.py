"""Generic helpers the scripts share: one-line errors, argparse types, the device flag, the MNIST
files, atomic writing and checked reading of files (checkpoints, CSVs, PNGs), a run directory's
lock and image grids. Nothing here
knows about VAEs (that is vae.py); torch and matplotlib are imported where they are used, so that
one_line_errors() can be installed before them.
"""
import argparse
import atexit
import csv
import math
import os
import signal
import sys
import tempfile

DEVICES = ('auto', 'cpu', 'cuda', 'mps')

# -----------------------------------------------------------------------------
# errors: one line on stderr, never a traceback, for what a user (not a bug) causes


def _raise_interrupt(signum, frame):
    """The first Ctrl-C or SIGTERM: KeyboardInterrupt, its clean-up and the one-line exit. A
    second one from then on exits at once (_exit_now), so that it cannot land in that clean-up or
    exit (Python would then die of SIGINT), and a run whose first was swallowed still stops."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_now)
    raise KeyboardInterrupt


def _exit_now(signum, frame):
    os.write(2, b'interrupted\n')
    os._exit(130)


def _ignore_after_interrupt():
    """atexit, once interrupted: ignore further signals for the rest of the exit. Python resets a
    handler of its own to the default as it finalizes, and a second Ctrl-C in the teardown that
    follows (torch's, tens of ms) would then kill it by SIGINT (exit status -2, not 130)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is _exit_now:
            signal.signal(sig, signal.SIG_IGN)


def describe(e):
    """An exception as the one line a user reads: OSError with its file, out-of-memory, ..."""
    if isinstance(e, OSError):
        return f"{e.strerror or str(e) or type(e).__name__}{f': {e.filename}' if e.filename else ''}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f'out of memory ({first})' if is_out_of_memory(e) else first


def was_interrupted(e, before=None):
    """Whether e is a KeyboardInterrupt or was raised while one was handled (torch.save, stopped
    mid-record, fails in its clean-up with a RuntimeError whose context is the interrupt), looking
    back no further than the exception `before` (one already being handled by the caller)."""
    seen = set()
    while e is not None and e is not before and id(e) not in seen:    # cause and context may cycle
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def is_out_of_memory(e):
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == 'OutOfMemoryError' or (
        isinstance(e, RuntimeError) and ('out of memory' in text or "can't allocate memory" in text))


def _excepthook(kind, e, tb):
    interrupted = was_interrupted(e)
    if not (interrupted or issubclass(kind, OSError) or is_out_of_memory(e)):
        return sys.__excepthook__(kind, e, tb)     # a bug: its traceback is what a report needs
    for sig in (signal.SIGINT, signal.SIGTERM):     # a Ctrl-C or SIGTERM while this exits
        signal.signal(sig, signal.SIG_IGN)
    try:
        sys.stdout.flush()
    except OSError:
        pass
    if interrupted and not issubclass(kind, KeyboardInterrupt):      # what failed on the way out
        sys.stderr.write(f'interrupted (then, while stopping: {describe(e)})\n')
    else:
        sys.stderr.write('interrupted\n' if interrupted else f'error: {describe(e)}\n')
    sys.stderr.flush()
    os._exit(130 if interrupted else 1)


def one_line_errors():
    """From here on, an interrupt (Ctrl-C, SIGTERM), an OSError (disk full, permissions, a
    directory where a file should be) or running out of memory that nothing handles ends the
    program with one line on stderr and exit status 130 (interrupt) or 1, not a traceback.
    Files being written are cleaned up on the way (write_atomic). Call it before the slow
    imports, so that Ctrl-C during them is one line too."""
    sys.excepthook = _excepthook
    atexit.register(_ignore_after_interrupt)
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:     # inherited as ignored (cmd &): stays so
            signal.signal(sig, _raise_interrupt)


# -----------------------------------------------------------------------------
# command line


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit status 2), not the usage block."""
    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (--help lists the flags)\n')


def number(kind, low=None, high=None, low_open=False):
    """argparse type: a finite kind (int/float) within [low, high] (or (low, high] if low_open)."""
    def parse(text):
        try:
            v = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f'expected {kind.__name__}, got {text!r}')
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f'expected a finite number, got {text!r}')
        if (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
            rng = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
            raise argparse.ArgumentTypeError(f'{v} is outside {rng}')
        return v
    return parse


def pick_device(name):
    """torch.device for --device auto/cpu/cuda/mps; one-line exit if it is not available."""
    import torch
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


def autocast(device, dtype):
    """Autocast to dtype on device; fp32 (a no-op) for dtype None."""
    import torch
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def native_bf16(device):
    """Whether device computes bf16 matmuls in hardware: a CUDA GPU that supports bf16, or a CPU
    with AVX512-BF16 or AMX-BF16 (elsewhere bf16 is emulated, slower than fp32)."""
    import torch
    if device.type == 'cuda':   # Ampere and later; older GPUs emulate it
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != 'cpu':
        return False
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split() for line in f if line.startswith('flags')), [])
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def keep_freed_memory():
    """Let glibc's malloc keep the memory a process frees instead of returning it to the system:
    a training step frees and reallocates tensors of megabytes, and each fresh mapping costs page
    faults and zeroing (a tenth of a CPU step; docs/measurements.md). A no-op without glibc."""
    import ctypes
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-3, 32 << 20)      # M_MMAP_THRESHOLD: below 32 MiB (glibc's maximum) from the heap
        libc.mallopt(-1, 1 << 30)       # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):
        pass




# -----------------------------------------------------------------------------
# MNIST files: download, checksums, the idx format

MNIST_SHA256 = {   # of the uncompressed files, as published with the data set's mirrors
    'train-images-idx3-ubyte': 'ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db',
    'train-labels-idx1-ubyte': '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5',
    't10k-images-idx3-ubyte': '0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7',
    't10k-labels-idx1-ubyte': 'ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2',
}
MNIST_FILES = tuple(MNIST_SHA256)


class DataError(Exception):
    """The MNIST files are missing or unreadable; the message says what to do."""


def check_mnist_files(raw):
    """DataError naming the first of the four files in raw/ that is unreadable or not the
    original (SHA-256 of the uncompressed file: truncated, damaged or another data set)."""
    import hashlib
    for name, digest in MNIST_SHA256.items():
        path = os.path.join(raw, name)
        h = hashlib.sha256()
        try:
            with open(path, 'rb') as f:
                for block in iter(lambda: f.read(1 << 20), b''):
                    h.update(block)
        except OSError as e:
            raise DataError(f'cannot read {path}: {e.strerror}') from None
        if h.hexdigest() != digest:
            raise DataError(f'{path} is not the original MNIST file (its SHA-256 differs: truncated, damaged or '
                            f'another data set); replace it with the original') from None


def load_mnist(root):
    """MNIST as uint8 tensors: train = first 50,000 of the official training set,
    val = its last 10,000, test = the official 10,000. Images (N, 1, 28, 28), labels (N,).
    Downloaded into root/MNIST/raw/ if missing (directories made for a download that fails are
    removed again); the four files are checked against their published checksums."""
    raw = os.path.join(root, 'MNIST', 'raw')
    present = all(os.path.exists(os.path.join(raw, f)) for f in MNIST_FILES)
    made = [d for d in (root, os.path.dirname(raw), raw) if not os.path.isdir(d)]
    try:
        if not present:
            from torchvision import datasets       # only to download (its import takes a second)
            datasets.MNIST(root, train=True, download=True)
            datasets.MNIST(root, train=False, download=True)
        check_mnist_files(raw)
        files = {f: read_idx(os.path.join(raw, f)) for f in MNIST_FILES}
    except DataError:
        raise
    except BaseException as e:  # offline download, unreadable files, Ctrl-C during a download, ...
        for d in reversed(made):
            try:
                os.rmdir(d)          # only if empty: a partial download stays for the next try
            except OSError:
                pass
        if not isinstance(e, Exception):
            raise
        raise DataError(f"could not load or download MNIST ({type(e).__name__}); put the four "
                        f"files {', '.join(MNIST_FILES)} (uncompressed) into {raw}/") from e
    x, y = files['train-images-idx3-ubyte'].unsqueeze(1), files['train-labels-idx1-ubyte'].long()  # (60000, 1, 28, 28) uint8
    return {'train': (x[:50000], y[:50000]), 'val': (x[50000:], y[50000:]),
            'test': (files['t10k-images-idx3-ubyte'].unsqueeze(1), files['t10k-labels-idx1-ubyte'].long())}


def read_idx(path):
    """An uncompressed idx file of unsigned bytes (MNIST's format) as a uint8 tensor of its shape."""
    import torch
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(dims)]
    return torch.frombuffer(data, dtype=torch.uint8, offset=4 + 4 * dims).view(shape)


# -----------------------------------------------------------------------------
# files

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path, write, text=False):
    """write(f) into a new temporary file beside path (a unique name, so that two writers never
    share one), then rename it onto path: readers see the old file or the new one, never a part.
    On any failure (disk full, Ctrl-C) the temporary file is removed and path is untouched."""
    handling = sys.exc_info()[1]                    # an interrupt being handled is not this write's
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix=f'.{os.path.basename(path)}.',
                               suffix='.tmp')
    try:
        with os.fdopen(fd, 'w' if text else 'wb', **({'newline': ''} if text else {})) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)              # mkstemp makes it private; a file's usual mode
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not isinstance(e, KeyboardInterrupt) and was_interrupted(e, handling):
            raise KeyboardInterrupt from e          # so that callers' `except KeyboardInterrupt` see it
        if isinstance(e, OSError) and e.filename in (None, tmp):   # name the file the user asked for
            raise OSError(e.errno, e.strerror, path) from None
        raise


def save_torch(obj, path):
    import torch
    write_atomic(path, lambda f: torch.save(obj, f))


def read_torch_file(path, device='cpu'):
    """torch.load(weights_only=True), with any failure as a ValueError of one line saying which:
    a missing file, a truncated or non-PyTorch file, or a pickle weights_only=True refuses."""
    if not os.path.isfile(path):
        raise ValueError(f'{path}: no such checkpoint file')
    import torch
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch.load raises UnpicklingError, RuntimeError, EOFError, ...
        if 'Unsupported global' in str(e):   # a pickle of arbitrary Python objects
            raise ValueError(f'{path} holds Python objects that torch.load(weights_only=True) refuses '
                             f'to unpickle: not a checkpoint of this project') from None
        raise ValueError(f'{path} is not a readable PyTorch file (truncated or not a checkpoint: '
                         f'{type(e).__name__})') from None


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures go to files, no display needed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def or_exit(load, *args, errors=(ValueError,), prefix=''):
    """load(*args), or a one-line exit 'error: <prefix><the error>' on one of `errors`."""
    try:
        return load(*args)
    except errors as e:
        sys.exit(f'error: {prefix}{e}')


def save_png(fig, path, **kw):
    """fig as a PNG at path (atomically); closes fig."""
    import matplotlib.pyplot as plt
    try:
        write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=100, **kw))
    finally:
        plt.close(fig)


def write_csv(rows, path, columns):
    """rows (dicts) as a CSV with these columns: None as empty, floats to 6 significant digits."""
    def write(f):
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: ('' if r.get(c) is None else f'{r[c]:.6g}' if isinstance(r[c], float) else r[c])
                        for c in columns})
    write_atomic(path, write, text=True)


def writable_dir(path, flag, files=()):
    """Create the directory path if needed and check, before any long work, that files can be
    written into it and that none of `files` (names in it) is a directory; one-line exit naming
    the flag otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        sys.exit(f'error: {flag} {path} is a file, not a directory')
    try:
        os.makedirs(path, exist_ok=True)
        fd, test = tempfile.mkstemp(dir=path, prefix='.write-test.')
        os.close(fd)
        os.unlink(test)
    except OSError as e:
        sys.exit(f'error: {flag} {path}: cannot write there ({e.strerror})')
    for name in files:
        if os.path.isdir(os.path.join(path, name)):
            sys.exit(f'error: {flag}: {os.path.join(path, name)} is a directory, where the output file goes')


# -----------------------------------------------------------------------------
# a run directory has one owner

def lock_dir(path):
    """Take the exclusive lock of the directory path (its file .lock) and return the open lock
    file: closing it releases the lock, and so does the end of the process, however it ends
    (kill -9 included). If another process holds it, exit with one line naming that process."""
    import time
    for _ in range(10):          # lock_holder's probe holds it for an instant: try for a second
        holder, f = _lock(path, take=True)
        if not holder:
            break
        time.sleep(0.1)
    if holder:
        sys.exit(f'error: {path} is in use by {holder}; wait for it to end or use another directory')
    return f


def lock_holder(path):
    """Who holds the lock of the directory path: '' if nobody, else e.g. 'train.py (pid 12)'."""
    return _lock(path, take=False)[0]


def _lock(path, take):
    try:
        import fcntl
    except ImportError:          # no flock (Windows): no lock
        return '', open(os.devnull)
    lock = os.path.join(path, '.lock')
    if not take and not os.path.exists(lock):
        return '', None
    f = open(lock, 'a+' if take else 'r')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        return holder, None
    if not take:
        f.close()                # closing releases it
        return '', None
    f.seek(0)
    f.truncate()
    f.write(f'{os.path.basename(sys.argv[0]) or "python"} (pid {os.getpid()})\n')
    f.flush()
    return '', f


# -----------------------------------------------------------------------------
# figures


def grid(imgs, nrow):
    """(N, 1, 28, 28) images in [0, 1] as one gray (H, W) array, nrow per row."""
    import numpy as np
    x = imgs.clamp(0, 1).float().cpu().numpy()[:, 0]                  # (N, H, W)
    n, h, w = x.shape
    rows = -(-n // nrow)
    out = np.full((rows * (h + 2) + 2, min(n, nrow) * (w + 2) + 2), 0.5, dtype=np.float32)   # torchvision's make_grid
    for i, img in enumerate(x):
        r, c = divmod(i, nrow)
        out[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = img
    return out
