"""One error style for every command-line tool: bad input -> one line on stderr, exit code 2, no traceback.

Set `--debug` (where a CLI offers it) or the environment variable VIAR_DEBUG=1 to see the traceback instead.
"""
import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import torch

from models.sampler import MAX_SEED  # seeds are 64-bit signed integers in torch and numpy
from models.schedules import MAX_ITERS_PER_SCALE, ScheduleError
from utils.checkpoint import CheckpointError

PathLike = Union[str, os.PathLike]
EXIT_USER_ERROR = 2
EXIT_SIGNAL_BASE = 128   # a run stopped by signal N exits with 128 + N, as a shell reports it (SIGTERM: 143)
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + 2
TRUE_WORDS, FALSE_WORDS = {'true', '1', 'yes'}, {'false', '0', 'no'}


class UserError(Exception):
    """Invalid input or environment that the user can fix; reported as one line."""


# Exceptions that describe bad input rather than a bug in this code.
USER_ERRORS = (UserError, CheckpointError, ScheduleError, ValueError, OSError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and a `--debug` flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument('--debug', action='store_true', help='show full tracebacks (same as VIAR_DEBUG=1)')

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f'{self.prog}: error: {message} (see --help)\n')

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(self._official_bools(sys.argv[1:] if args is None else list(args)), namespace)

    def _official_bools(self, argv):
        """Accept the official `--flag=True|False` and `--flag True|False` for BooleanOptionalAction flags; False
        means false (the official sampling.py's `type=bool` read any non-empty word as true)."""
        flags = {s for a in self._actions if isinstance(a, argparse.BooleanOptionalAction)
                 for s in a.option_strings if not s.startswith('--no-')}
        words = TRUE_WORDS | FALSE_WORDS
        out, rest = [], list(argv)
        while rest:
            arg = rest.pop(0)
            name, eq, value = arg.partition('=')
            if name in flags and not eq and rest and rest[0].lower() in words:
                value = rest.pop(0)
            elif not (name in flags and eq and value.lower() in words):
                out.append(arg)
                continue
            out.append(name if value.lower() in TRUE_WORDS else '--no-' + name[2:])
        return out


# ---- numeric flags: one validation layer, as argparse types (a bad value fails at parse time, before any file) ---
# Architecture sizes far beyond any real model: larger values are typos that would only fail later (or never finish).
MAX_DEPTH, MAX_WIDTH, MAX_VOCAB = 1024, 65536, 2 ** 24


def _range_text(kind: str, lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    """'a positive integer', 'a finite number >= 0', 'an integer in [0, 1000]', ..."""
    if kind == 'integer' and lo == 1 and hi is None:
        return 'a positive integer'
    article = 'an' if kind == 'integer' else 'a'
    if hi is None:
        return f'{article} {kind}' + ('' if lo is None else f' {">" if lo_open else ">="} {lo}')
    if lo is None:
        return f'{article} {kind} {"<" if hi_open else "<="} {hi}'
    return f'{article} {kind} in {"(" if lo_open else "["}{lo}, {hi}{")" if hi_open else "]"}'


def int_range(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (None: unbounded)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f'must be {_range_text("integer", lo, hi)}, got {text}')
        return value

    parse.__name__ = 'int_range'
    return parse


def finite_float(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
                 hi_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in [lo, hi] (`lo_open` / `hi_open` exclude the bound; None: unbounded)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f'must be {_range_text("finite number", lo, hi, lo_open, hi_open)}, '
                                             f'got {text}')
        return value

    parse.__name__ = 'finite_float'
    return parse


SEED = int_range(0, MAX_SEED)
POSITIVE = int_range(1)
NON_NEGATIVE = int_range(0)
NON_NEGATIVE_FLOAT = finite_float(0)
PROBABILITY = finite_float(0, 1)
ITERS = int_range(0, MAX_ITERS_PER_SCALE)


def refuse_overwriting_inputs(inputs: Dict[str, Optional[PathLike]], outputs: Sequence[PathLike], fix: str):
    """Inputs are never outputs: a one-line error when a file about to be written is (or links to) one of `inputs`
    (flag -> path), naming both; `fix` says which flag to change."""
    for flag, src in inputs.items():
        if src is None or not os.path.exists(src):
            continue
        for out in outputs:
            if _same_path(src, out):
                raise UserError(f'{flag} {src} would be overwritten by an output ({out}); pass another {fix}')


def _same_path(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def signal_exit_code(signum: int) -> int:
    """The exit code of a run that stopped cleanly because it received signal `signum`."""
    return EXIT_SIGNAL_BASE + signum


def writable_dir(path, flag: str, create: bool = True) -> Path:
    """Check (before any long work) that files can be written in folder `path`, creating it if `create`; otherwise a
    one-line error naming the flag to fix."""
    path = Path(path)
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test.'):
            pass
    except OSError as e:
        raise UserError(f'{flag}: {path} is not a writable folder ({e.strerror or e}); pass another {flag}') from None
    return path


def one_line(e: BaseException) -> str:
    """The exception's message on a single line."""
    text = ' '.join(part.strip() for part in str(e).splitlines() if part.strip())
    return text or type(e).__name__


def run(main: Callable[[argparse.Namespace], Optional[int]], parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse arguments and call `main(args)`, turning user errors into one line and exit code 2."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a flag argparse refused (its line is printed) or --help: return the code, as main does
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    debug = bool(getattr(args, 'debug', False) or os.environ.get('VIAR_DEBUG'))
    try:
        return main(args) or 0
    except KeyboardInterrupt:
        print(f'{parser.prog}: interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED
    except torch.OutOfMemoryError as e:
        if debug:
            raise
        print(f'{parser.prog}: error: out of memory ({one_line(e)[:200]}); lower the batch size', file=sys.stderr)
        return EXIT_USER_ERROR
    except USER_ERRORS as e:
        if debug:
            raise
        print(f'{parser.prog}: error: {one_line(e)}', file=sys.stderr)
        return EXIT_USER_ERROR


def main_entry(main: Callable[[argparse.Namespace], Optional[int]], parser: argparse.ArgumentParser):
    """`if __name__ == '__main__': main_entry(main, get_parser())`."""
    sys.exit(run(main, parser))
