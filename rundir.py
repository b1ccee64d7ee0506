"""A training run's name and directory: one process owns the directory (a lock), a finished run in
it is never replaced unless told (--resume continues it, --overwrite deletes it), and last.pt holds
all an exact resume needs (model, optimiser, RNG states, the metrics so far, the best epoch). Every file
is written atomically (utils.save_torch), so a kill at any moment leaves the last whole one."""
import math
import os
import random
import shlex
import sys
from contextlib import contextmanager

import torch

import utils
import vae

RUN_FILES = ('model.pt', 'last.pt', 'metrics.csv', 'reconstructions.png', 'samples.png')
LAST_FORMAT = vae.CKPT_FORMAT + '/last'
NEWER_FLAGS = ('objective', 'iw_samples', 'val_subset')   # absent from an older last.pt (options: their defaults)
RESUME_MAY_CHANGE = ('epochs', 'patience', 'device', 'data_dir', 'out_dir', 'resume', 'overwrite', 'compare_plan')  # all other flags must match


def model_name(args, lik):
    """The likelihood, its options not at their defaults and the objective if not the ELBO,
    from a checkpoint's training arguments: 'categorical-K64', 'bernoulli-iwae5'."""
    return args['dist'] + lik.tag() + objective_tag(args)


def objective_tag(args):
    """'' for the ELBO, '-iwae<K>' or '-<objective>' otherwise (a suffix of run names)."""
    objective = args.get('objective', 'elbo')
    return '' if objective == 'elbo' else f"-iwae{args['iw_samples']}" if objective == 'iwae' else f'-{objective}'


def registry_options():
    """Every option a likelihood declares -> (its Option, the --dist names that take it)."""
    out = {}
    for dist, cls in vae.LIKELIHOODS.items():
        for name, opt in cls.options.items():
            out.setdefault(name, (opt, []))[1].append(dist)
    return out


def command(args, parser):
    """The command line that resumes this run: train.py with every flag not at its default."""
    defaults = {k: parser.get_default(k) for k in vars(args)}
    defaults.update({k: o.default for k, o in vae.LIKELIHOODS[args.dist].options.items()})
    flags = [f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items()
             if k not in ('resume', 'overwrite', 'compare_plan') and v != defaults[k]]
    return ' '.join(['python train.py'] + flags + ['--resume'])


def rng_states(gen):
    return {'torch': torch.get_rng_state(), 'generator': gen.get_state(), 'device': gen.device.type,
            'python': random.getstate(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states, gen, seed, epoch):
    """Restore rng_states. A generator (or CUDA state) saved on another kind of device cannot be
    restored here: it is reseeded from (seed, epoch) instead, and the returned note says that
    the data order and noise from here on differ from an uninterrupted run (else None)."""
    torch.set_rng_state(states['torch'])
    random.setstate(states['python'])
    same = states.get('device', gen.device.type) == gen.device.type
    if same:
        try:
            gen.set_state(states['generator'])
        except RuntimeError:
            same = False
    if not same:
        gen.manual_seed((seed * 1_000_003 + epoch) % 2 ** 63)
    if states['cuda'] and torch.cuda.is_available() and len(states['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states['cuda'])
    elif gen.device.type == 'cuda':          # a CUDA run's noise comes from the CUDA state
        same = False
    return None if same else (f"note: last.pt was saved on {states.get('device', 'another device')}, this run is on "
                              f"{gen.device.type}: the model and optimiser continue exactly, but the data order "
                              f"and noise from here on differ from an uninterrupted run")


def load_last(args, parser, rule):
    """The training state in <out-dir>/last.pt, checked to come from a run with the same flags
    whose checkpoint this version picks by the same rule: rule(likelihood class, objective, K)[0]."""
    path = os.path.join(args.out_dir, 'last.pt')
    if not os.path.isfile(path):
        sys.exit(f'error: --resume: there is no {path} to resume from (run without --resume to start)')
    state = utils.or_exit(utils.read_torch_file, path, prefix='--resume: ')
    if not isinstance(state, dict) or state.get('format') != LAST_FORMAT:
        sys.exit(f"error: --resume: {path} was not written by this project's train.py")
    if args.precision == 'auto':          # continue in the precision the run was started in
        args.precision = state['args'].get('precision', 'fp32')
    lik = vae.LIKELIHOODS.get(state['args'].get('dist'), vae.Likelihood)
    objective = state['args'].get('objective', 'elbo')
    selected_by = rule(lik, objective, state['args'].get('iw_samples', 5))[0]
    if state.get('selected_by', 'val_iwae_nats' if objective == 'iwae' else 'val_elbo_nats') != selected_by:
        sys.exit(f"error: --resume: {path} comes from a version of train.py that kept the epoch with the best "
                 f"{state.get('selected_by', 'validation objective')}, this one keeps the best {selected_by}: it cannot "
                 f"be continued; start over (train.py --overwrite, or delete {path} for make), or use another --out-dir")
    older = {**{k: parser.get_default(k) for k in NEWER_FLAGS}, **{k: o.default for k, o in lik.options.items()},
             **lik.before_options}                          # what a run from before them had
    saved = {**state['args'], **{k: v for k, v in older.items() if k not in state['args']}}   # its own flags first
    others = set(registry_options()) - set(lik.options)    # other likelihoods' options: not this run's
    for k, v in saved.items():
        if k not in RESUME_MAY_CHANGE and k not in others and getattr(args, k, None) != v:
            flag = '--' + k.replace('_', '-')
            sys.exit(f'error: --resume: {path} was written with {flag} {v}, this run has {flag} '
                     f'{getattr(args, k, None)}; resume with the same flags, start over with --overwrite, '
                     f'or use another --out-dir')
    if args.epochs < state['epoch']:
        sys.exit(f"error: --resume: {path} is at epoch {state['epoch']}; --epochs {args.epochs} would end "
                 f"before it (--epochs may only grow)")
    return state


def existing_run(args, locked=False):
    """The files of a run (finished or interrupted) already in --out-dir that this run replaces:
    without --resume there must be none, unless --overwrite says to delete them. Unless this
    process holds the lock (locked), no other process may be using --out-dir."""
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        sys.exit(f'error: --out-dir {args.out_dir} is a file, not a directory')
    holder = utils.lock_holder(args.out_dir) if os.path.isdir(args.out_dir) and not locked else ''
    if holder:
        sys.exit(f'error: --out-dir {args.out_dir} is in use by {holder}; wait for it to end or use another --out-dir')
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out_dir, f))]
    if held and not args.resume and not args.overwrite:
        sys.exit(f"error: --out-dir {args.out_dir} holds a run ({', '.join(held)}): --resume continues it, "
                 f"--overwrite deletes it and starts over, or choose another --out-dir")
    return [] if args.resume else held


@contextmanager
def owned(args, parser, rule):
    """--out-dir, locked by this process for the block; yields last.pt's state under --resume
    (else None), after deleting the old run under --overwrite. Call existing_run (and
    load_last) before the long checks, so that a refused run costs nothing."""
    utils.writable_dir(args.out_dir, '--out-dir')
    lock = utils.lock_dir(args.out_dir)
    try:
        old_run = existing_run(args, locked=True)   # again, now that no other process can change it
        state = load_last(args, parser, rule) if args.resume else None
        for f in old_run:   # --overwrite, all checks passed; model.pt first, so it never outlives its run
            os.remove(os.path.join(args.out_dir, f))
        if old_run:
            print(f"--overwrite: deleted {', '.join(old_run)} in {args.out_dir}")
        yield state
    finally:
        lock.close()


class Progress:
    """The epochs done: metrics.csv's rows, and the best epoch by `select` (a metrics column;
    sign +1 where larger is better) with its weights. last.pt holds it, with the model,
    optimiser and RNG states (save_last, restore)."""

    def __init__(self, select, sign, said):
        self.select, self.sign, self.said = select, sign, said
        self.rows, self.done = [], 0
        self.best = self.best_elbo = -math.inf
        self.best_epoch = self.best_state = None

    def record(self, row, model):
        """Add an epoch's row (floats rounded to 4 decimals); True if it is the best so far."""
        row['selected_by'] = self.select
        self.rows.append({k: (f'{v:.4f}' if isinstance(v, float) else v) for k, v in row.items()})
        improved = self.sign * row[self.select] > self.best
        if improved:
            self.best, self.best_elbo, self.best_epoch = self.sign * row[self.select], row['val_elbo_nats'], row['epoch']
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.done = row['epoch']
        return improved

    def stalled(self, patience):
        """The line that stops training early: `patience` epochs without a better one ('' to go on)."""
        if patience and self.best_epoch is not None and self.done - self.best_epoch >= patience:
            return (f'early stop: no better {self.said} in the {self.done - self.best_epoch} epochs since epoch '
                    f'{self.best_epoch} (--patience {patience})')
        return ''

    def best_so_far(self):
        return f' (best {self.said} {self.sign * self.best:.4f} at epoch {self.best_epoch})' if self.best_state else ''

    def save_last(self, path, args, model, opt, gen):
        utils.save_torch({
            'format': LAST_FORMAT,
            'args': vars(args),
            'epoch': self.done,
            'state_dict': model.state_dict(),
            'optimizer': opt.state_dict(),
            'rng': rng_states(gen),
            'rows': self.rows,
            'selected_by': self.select,
            'best': self.best,
            'best_elbo': self.best_elbo,
            'best_epoch': self.best_epoch,
            'best_state': self.best_state,
        }, path)

    def start(self, state, path, args, model, opt, gen):
        """Continue from last.pt's state, saying so, or write the first last.pt."""
        if state is None:
            return self.save_last(path, args, model, opt, gen)
        note = self.restore(state, model, opt, gen, args.seed)
        print(f'resuming {path} after epoch {self.done}' + (f'\n{note}' if note else ''), flush=True)

    def restore(self, state, model, opt, gen, seed):
        """Continue from last.pt's state: the model, optimiser, progress and RNG states (a note
        where those cannot be restored exactly, else None)."""
        model.load_state_dict(state['state_dict'])
        opt.load_state_dict(state['optimizer'])
        self.best, self.best_epoch, self.done = state['best'], state['best_epoch'], state['epoch']
        self.rows = [{**r, 'selected_by': self.select} for r in state['rows']]   # an older last.pt's rows lack it
        self.best_elbo = state.get('best_elbo') or next((float(r['val_elbo_nats']) for r in self.rows
                                                         if r['epoch'] == self.best_epoch), -math.inf)   # an older last.pt
        device = next(model.parameters()).device
        self.best_state = state['best_state'] and {k: v.to(device) for k, v in state['best_state'].items()}
        return set_rng_states(state['rng'], gen, seed, self.done)

    def save_model(self, path, args, extra):
        """model.pt: the best epoch's weights, self-describing (vae.load_checkpoint)."""
        utils.save_torch({
            'format': vae.CKPT_FORMAT,
            'args': {**vars(args), 'resume': False, 'overwrite': False, **extra},
            'state_dict': self.best_state,
            'epoch': self.best_epoch,
            'epochs_trained': self.done,
            'val_elbo_nats': self.best_elbo,
            'selected_by': self.select,
            'val_selected': self.sign * self.best,
            'torch': str(torch.__version__),
        }, path)
