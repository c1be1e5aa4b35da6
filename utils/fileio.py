"""The one way this project writes files: atomically, durably, and never through a symbolic link.

`atomic_write` creates a fresh temp file beside the target (`.NAME.XXXXXXXX.tmp`, O_CREAT|O_EXCL: a link or file
planted under that name makes the create fail instead of being followed), writes it, flushes and fsyncs it, renames
it over the target (a link at the target is replaced, not written through) and fsyncs the folder. A reader sees the
old file or the new one, never half of one. Logs that grow line by line open with O_NOFOLLOW (`open_append`).
"""
import errno
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Dict, Iterator, Union

PathLike = Union[str, os.PathLike]
FILE_MODE = 0o666  # before the umask: written files are as readable as any other file the user creates
_UMASK = os.umask(0)
os.umask(_UMASK)
TEMP_SUFFIX = '.tmp'


class LinkRefused(OSError):
    """A path to write that is a symbolic link (this project never writes through one)."""


def _new_temp(path: Path) -> tuple:
    """(fd, name) of a fresh hidden temp file beside `path`, with the umask's permissions (mkstemp's are owner-only,
    which would hide checkpoints from collaborators on a shared cluster)."""
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE & ~_UMASK)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def fsync_dir(folder: PathLike):
    """Make a rename inside `folder` durable (a crash right after it cannot bring back the old entry)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: PathLike, mode: str = 'wb') -> Iterator[IO]:
    """`with atomic_write(path) as f: ...` writes `path` all at once (see the module docstring); on an exception the
    target is untouched and the temp file removed."""
    path = Path(path)
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: PathLike, text: str):
    """Replace `path` with `text`, atomically."""
    with atomic_write(path, 'w') as f:
        f.write(text)


def write_bytes_atomic(path: PathLike, data: bytes):
    """Replace `path` with `data`, atomically."""
    with atomic_write(path) as f:
        f.write(data)


def write_json_atomic(path: PathLike, obj: Any):
    """Replace `path` with `obj` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1) + '\n')


def copy_atomic(src: PathLike, dst: PathLike):
    """Replace `dst` with a copy of `src`, atomically."""
    with open(src, 'rb') as fin, atomic_write(dst) as fout:
        shutil.copyfileobj(fin, fout)


def link_atomic(src: PathLike, dst: PathLike):
    """Make `dst` a copy of the finished file `src` without rewriting it: a hard link under a fresh temp name (a copy
    where links are not supported), renamed over `dst`. Later replacing `src` leaves `dst` untouched."""
    src, dst = Path(src), Path(dst)
    fd, tmp = _new_temp(dst)
    os.close(fd)
    os.unlink(tmp)  # link() refuses an existing name, so a link planted here in between fails instead of followed
    try:
        os.link(src, tmp)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise
        copy_atomic(src, dst)
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(dst.parent)


def open_append(path: PathLike) -> IO:
    """`path` opened for appending text, created if missing; a symbolic link there is refused, not followed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LinkRefused(errno.ELOOP, 'is a symbolic link; refusing to write through it', str(path)) from None
        raise
    return os.fdopen(fd, 'a')


def create_new(path: PathLike) -> IO:
    """A fixed-name work file (e.g. shared by several processes) created empty for writing: whatever sits at `path`,
    a stale file or a planted link, is removed first, and the create is exclusive, so no link is followed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE), 'w+b')


def finish_new(tmp: PathLike, path: PathLike):
    """Durably move a work file from `create_new` to its final name."""
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def read_json_object(path: PathLike) -> Dict[str, Any]:
    """A JSON file that must hold an object, or a ValueError naming the file and what is wrong."""
    path = Path(path)
    if not stat.S_ISREG(path.stat().st_mode):
        raise ValueError(f'{path}: not a regular file')
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{path}: not a readable JSON file ({e}); remove it or restore it') from None
    if not isinstance(obj, dict):
        raise ValueError(f'{path}: expected a JSON object, found {type(obj).__name__}; remove it or restore it')
    return obj
