"""Lossless compression of the MNIST test images with a trained VAE: bits-back coding with ANS.

    python compress.py runs/compare/categorical-z32-s0 --data-dir ../shared/mnist

BB-ANS (Townsend et al. 2019), through constriction's stack coder (rANS, 32-bit words, 24-bit
probabilities). Per image, chained on one stack so that only the first pays for the bits it
borrows: pop z from q(z|x), push x with p(x|z), push z with p(z). The latents are discretised
into 2^--latent-bits buckets of equal prior mass per dim (so p(z) is uniform over them), z at a
bucket's median; q gives each bucket its mass. Each pixel is coded with its likelihood's own
table (Likelihood.log_prob_symbols): the 256 levels of categorical, logistic and logistic-mix,
each density's exact 8-bit bin masses, bernoulli's two values of the binarised test set (its
own row). The file is written, read back and decoded, and every image checked bit for bit.
Beside it: the model's negative ELBO of the same images (the rate bits-back reaches, up to the
discretisation), and gzip, bz2, lzma and PNG of the same bytes. Appends a row to --csv.
"""
import utils
if __name__ == '__main__':
    utils.one_line_errors()   # first: from here on Ctrl-C, a full disk or OOM is one line, not a traceback

import bz2  # noqa: E402
import csv  # noqa: E402
import gzip  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import lzma  # noqa: E402
import os  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402

import constriction  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import rundir  # noqa: E402
import vae  # noqa: E402
from utils import number  # noqa: E402

MAGIC = b'conv-vae-likelihoods/bb-ans/1\n'   # then the SHA-256 of the rest, the header's length, header, words
HEADER = {'checkpoint_sha256': str, 'n': int, 'latent_bits': int, 'threads': int, 'torch': str, 'constriction': str,
          'images_sha256': str}
INIT_WORDS = 32     # random 32-bit words the first image borrows its latent bits from
COLUMNS = ['run', 'dist', 'data', 'n', 'latent_bits', 'file_bytes', 'file_bits_per_dim', 'elbo_bits_per_dim',
           'gap_percent', 'encode_seconds', 'decode_seconds', 'gzip_bits_per_dim', 'bz2_bits_per_dim',
           'lzma_bits_per_dim', 'png_bits_per_dim', 'device', 'torch']


class FormatError(ValueError):
    """A file that is not, or no longer, what compress.py wrote for this model."""


def sha256(data):
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def encoder_input(lik, x8):
    """What the encoder sees of one image (1, 1, 28, 28): its likelihood's data, with the same fixed
    noise for every image where that data has noise (dequantised), so the decoder can recompute it."""
    return lik.data(x8, torch.Generator().manual_seed(vae.EVAL_SEED))


# -----------------------------------------------------------------------------
# the coder: one image at a time, the same computation on both sides


class BitsBack:
    """The models of one VAE for the coder: the latent buckets, q(z|x) over them, and the pixel
    tables of p(x|z). Every table is computed for one image at a time, so that encoding and
    decoding run the very same operations (same shapes, device, threads, float64)."""

    def __init__(self, model, latent_bits):
        self.model, self.lik = model, model.lik
        n = 2 ** latent_bits
        self.edges = torch.special.ndtri(torch.arange(n + 1, dtype=torch.float64) / n)   # (n + 1,), -inf .. inf
        self.centres = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n).float()   # (n,)
        self.table = constriction.stream.model.Categorical(perfect=False)   # probabilities given per symbol
        self.prior = constriction.stream.model.Uniform(n)
        self.dims = model.latent_dim

    def symbols(self, x8):
        """8-bit image (1, 1, 28, 28) -> its pixels' symbols (784,) int32."""
        return (x8.long() * (self.lik.symbols - 1) // 255).flatten().int().numpy()

    def image(self, s):
        """Symbols (784,) -> the 8-bit image (1, 1, 28, 28)."""
        return (torch.from_numpy(s).long() * 255 // (self.lik.symbols - 1)).to(torch.uint8).view(1, 1, 28, 28)

    def posterior(self, x8):
        """q(z|x) of one image as the masses of each dim's buckets: (D, 2^bits) float64."""
        mu, logvar = (t.double().view(-1, 1) for t in self.model.encode(encoder_input(self.lik, x8)))  # (D, 1) each
        t = (self.edges - mu) / (0.5 * logvar).exp()                        # (D, 2^bits + 1)
        # below the mean differences of the CDF, above it of the survival function: a difference
        # of two values near 1 would lose its digits
        below, above = torch.special.ndtr(t).diff(dim=-1), -torch.special.ndtr(-t).diff(dim=-1)
        return np.ascontiguousarray(torch.where(t[:, :-1] > 0, above, below).numpy())   # constriction reads the buffer in C order

    def pixels(self, z):
        """p(x|z) of bucket indices z (D,) as probabilities (784, symbols) float64."""
        h = self.model.decode(self.centres[torch.from_numpy(z).long()].view(1, -1))    # (1, 28, 28, F)
        log_p = self.lik.log_prob_symbols(h).reshape(-1, self.lik.symbols)             # (784, S)
        p = (log_p - log_p.max(-1, keepdim=True).values).exp()
        if not torch.isfinite(p).all():
            raise FloatingPointError('the likelihood gave a table that is not finite')
        return np.ascontiguousarray(p.numpy())        # (a view of a movedim otherwise): constriction reads C order

    def encode(self, coder, x8):
        z = coder.decode(self.table, self.posterior(x8))              # bits back: (D,)
        coder.encode_reverse(self.symbols(x8), self.table, self.pixels(z))
        coder.encode_reverse(z, self.prior)

    def decode(self, coder):
        z = coder.decode(self.prior, self.dims)
        x8 = self.image(coder.decode(self.table, self.pixels(z)))
        coder.encode_reverse(z, self.table, self.posterior(x8))       # gives the borrowed bits back
        return x8


def start_words(seed=0):
    """The words the stack starts from: random (a nonzero top word), the same for every file."""
    words = np.random.default_rng(seed).integers(0, 2 ** 32, INIT_WORDS, dtype=np.uint64).astype(np.uint32)
    words[-1] |= 1
    return words


@torch.inference_mode()
def encode(model, x8, latent_bits):
    """8-bit images (N, 1, 28, 28) -> the coder's words (uint32); image 0 goes in first, so comes out last."""
    bb, coder = BitsBack(model, latent_bits), constriction.stream.stack.AnsCoder(start_words())
    for i in tqdm(range(x8.shape[0]), 'encode', leave=False, disable=None):
        bb.encode(coder, x8[i:i + 1])
    return coder.get_compressed()


@torch.inference_mode()
def decode(model, words, n, latent_bits):
    """The words of `encode` -> the n images (n, 1, 28, 28) uint8; FormatError if they do not decode
    back to the start words (a corrupted file, or another model or machine)."""
    bb, out = BitsBack(model, latent_bits), []
    try:
        coder = constriction.stream.stack.AnsCoder(words.copy())
        for _ in tqdm(range(n), 'decode', leave=False, disable=None):
            out.append(bb.decode(coder))
        rest = coder.get_compressed()
    except (ValueError, RuntimeError, AssertionError) as e:    # constriction's errors on words it cannot read
        raise FormatError(f'the coded data cannot be decoded ({e})') from None
    if not np.array_equal(rest, start_words()):
        raise FormatError('the coded data did not decode back to its start: the file is corrupted, or was '
                          'written with another model, device or number of threads')
    return torch.cat(out[::-1])


# -----------------------------------------------------------------------------
# the file: a header (JSON) that says what decodes it, then the words


def machine():
    """What the tables' floating point depends on: decoding needs the same."""
    return {'threads': torch.get_num_threads(), 'torch': str(torch.__version__),
            'constriction': importlib.metadata.version('constriction')}


def header_of(ckpt_path, n, latent_bits, x8):
    """The header of a file coding images x8 (n, 1, 28, 28) with the checkpoint at ckpt_path."""
    with open(ckpt_path, 'rb') as f:
        ckpt_hash = sha256(f.read())
    return {'checkpoint_sha256': ckpt_hash, 'n': n, 'latent_bits': latent_bits, **machine(),
            'images_sha256': sha256(x8.numpy().tobytes())}


def write_file(path, header, words):
    rest = struct.pack('<I', len(head := json.dumps(header).encode())) + head + words.astype('<u4').tobytes()
    utils.write_atomic(path, lambda f: f.write(MAGIC + hashlib.sha256(rest).digest() + rest))


def read_file(path):
    """-> (header dict, words); FormatError on anything but an intact file of this format."""
    with open(path, 'rb') as f:
        data = f.read()
    if not data.startswith(MAGIC):
        raise FormatError(f'{path} is not a file written by compress.py')
    digest, rest = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(rest).digest() != digest or len(rest) < 4:
        raise FormatError(f'{path} is damaged (its checksum does not match)')
    (size,) = struct.unpack_from('<I', rest)
    try:
        header, body = json.loads(rest[4:4 + size].decode()), rest[4 + size:]
    except ValueError:        # JSON or UTF-8
        header, body = None, b''
    if not isinstance(header, dict) or any(not isinstance(header.get(k), t) for k, t in HEADER.items()) or \
            not 1 <= header['latent_bits'] <= 16 or len(body) % 4:
        raise FormatError(f'{path} has a valid checksum but not the header or length compress.py writes')
    return header, np.frombuffer(body, dtype='<u4').astype(np.uint32)


def decompress(model, ckpt_path, path):
    """The images in a file of compress.py, decoded with the model of ckpt_path; FormatError if the
    file is damaged, was written with another model, threads or versions, or does not decode exactly."""
    header, words = read_file(path)
    with open(ckpt_path, 'rb') as f:
        if sha256(f.read()) != header['checkpoint_sha256']:
            raise FormatError(f'{path} was written with another checkpoint than {ckpt_path}')
    if (now := machine()) != (then := {k: header[k] for k in now}):
        raise FormatError(f'{path} was written with {then}, this is {now}: decode with the same, as the '
                          f'tables must be computed bit for bit alike')
    x8 = decode(model, words, header['n'], header['latent_bits'])
    if sha256(x8.numpy().tobytes()) != header['images_sha256']:
        raise FormatError(f'{path} decoded to other images than it was written from')
    return x8


# -----------------------------------------------------------------------------
# the rates beside it


@torch.inference_mode()
def elbo_bits_per_dim(model, x8, k=10, batch=100):
    """The model's negative ELBO of the coded images x8 in bits/dim, k draws per image: of their
    8-bit levels where it has that score (log_prob_8bit), else of its own data (bernoulli's bits)."""
    gen, total = torch.Generator().manual_seed(vae.EVAL_SEED), 0.0
    for xb in x8.split(batch):
        x = torch.cat([encoder_input(model.lik, xb[i:i + 1]) for i in range(xb.shape[0])])   # as the coder's q(z|x)
        est = vae.log_weights(model, x, k, gen, x8=xb)           # (k, B) log weights
        total += est.ranked.mean(0).sum().item()                 # the mean of log w over q is the ELBO
    return -total / x8.shape[0] / vae.BITS


def baselines(x8, symbols):
    """Bits/dim of the same images (N, 1, 28, 28) through general-purpose coders: their bytes (two
    symbols: packed 8 pixels to a byte), and one PNG of them one under another (two symbols: 1-bit)."""
    from PIL import Image
    pixels, dims, png = x8.view(-1, 28).numpy(), x8.numel(), io.BytesIO()
    raw = np.packbits(pixels > 0).tobytes() if symbols == 2 else pixels.tobytes()
    (Image.fromarray(pixels > 0) if symbols == 2 else Image.fromarray(pixels)).save(png, format='PNG', optimize=True)
    sizes = {'gzip': len(gzip.compress(raw, 9)), 'bz2': len(bz2.compress(raw, 9)),
             'lzma': len(lzma.compress(raw, preset=9)), 'png': len(png.getvalue())}
    return {f'{k}_bits_per_dim': 8 * v / dims for k, v in sizes.items()}


def merge_rows(path, row):
    """path's rows with row in place of any with its run, n and latent bits."""
    key = lambda r: (r['run'], str(r['n']), str(r['latent_bits']))     # noqa: E731
    rows = []
    if os.path.exists(path):
        with open(path, newline='') as f:
            rows = [r for r in csv.DictReader(f) if key(r) != key(row)]
    return rows + [row]


def parse_args(argv=None):
    p = utils.Parser(description=__doc__.split('\n\n')[0])
    p.add_argument('run', help="a run directory holding train.py's model.pt")
    p.add_argument('--n', type=number(int, 1, 10000), default=10000, help='the first N test images (default all)')
    p.add_argument('--out', default=None, help='the coded file (default results/compress/<run name>.bbans)')
    p.add_argument('--data-dir', default='data', help='directory holding MNIST/raw/')
    p.add_argument('--latent-bits', type=number(int, 1, 16), default=12,
                   help='each latent dim in 2^bits buckets of equal prior mass (default 12)')
    p.add_argument('--csv', default='results/compress.csv', help='the table a row is added to')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ckpt_path = os.path.join(args.run, 'model.pt')
    model, ckpt = utils.or_exit(vae.load_checkpoint, ckpt_path)
    name = rundir.model_name(ckpt['args'], model.lik)
    out = args.out or os.path.join('results', 'compress', f"{os.path.basename(os.path.normpath(args.run))}.bbans")
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    os.makedirs(os.path.dirname(args.csv) or '.', exist_ok=True)
    x8 = model.lik.coded(utils.or_exit(utils.load_mnist, args.data_dir, errors=utils.DataError)['test'][0][:args.n])
    print(f'{name}: coding {args.n} test images ({model.lik.symbols} symbols per pixel, latent buckets of '
          f'{args.latent_bits} bits) on the cpu with {torch.get_num_threads()} threads -> {out}', flush=True)
    t = time.time()
    words = encode(model, x8, args.latent_bits)
    write_file(out, header_of(ckpt_path, args.n, args.latent_bits, x8), words)
    encode_s, t = time.time() - t, time.time()
    got = utils.or_exit(decompress, model, ckpt_path, out, errors=FormatError)
    decode_s = time.time() - t
    if not torch.equal(got, x8):
        i = int((got != x8).flatten(1).any(1).nonzero()[0])
        raise SystemExit(f'error: image {i} did not decode to itself: {out} is not lossless')
    dims = x8.numel()
    row = {'run': args.run, 'dist': name, 'data': f'{model.lik.symbols} levels',
           'n': args.n, 'latent_bits': args.latent_bits, 'file_bytes': os.path.getsize(out),
           'file_bits_per_dim': 8 * os.path.getsize(out) / dims,
           'elbo_bits_per_dim': elbo_bits_per_dim(model, x8),
           'encode_seconds': encode_s, 'decode_seconds': decode_s, **baselines(x8, model.lik.symbols),
           'device': f'cpu ({torch.get_num_threads()} threads)', 'torch': str(torch.__version__)}
    row['gap_percent'] = 100 * (row['file_bits_per_dim'] / row['elbo_bits_per_dim'] - 1)
    utils.write_csv(merge_rows(args.csv, row), args.csv, COLUMNS)
    print(f"all {args.n} images decode bit for bit. {out}: {row['file_bytes']:,} bytes, "
          f"{row['file_bits_per_dim']:.4f} bits/dim; negative ELBO {row['elbo_bits_per_dim']:.4f} bits/dim, "
          f"gap {row['gap_percent']:+.2f} %; encode {encode_s:.0f} s, decode {decode_s:.0f} s\n"
          + '  '.join(f"{k}: {row[f'{k}_bits_per_dim']:.4f}" for k in ('gzip', 'bz2', 'lzma', 'png'))
          + f' bits/dim -> {args.csv}')
    return row


if __name__ == '__main__':
    main()
