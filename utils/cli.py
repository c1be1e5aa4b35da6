"""One error style for every command-line tool: bad input -> one line on stderr, exit code 2, no traceback.

Set `--debug` (where a CLI offers it) or the environment variable VIAR_DEBUG=1 to see the traceback instead.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from models.schedules import ScheduleError
from utils.checkpoint import CheckpointError

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
    args = parser.parse_args(argv)
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
