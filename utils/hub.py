"""Checkpoints from the Hugging Face Hub: `hf:OWNER/REPO/FILE` resolved through huggingface_hub's cache.

A file already in the cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) is used without any network access;
otherwise it is downloaded once into the cache. Offline (HF_HUB_OFFLINE=1) or without a network, a missing file is
one line saying which file to download and where to pass it.
"""
import logging
from contextlib import contextmanager
from typing import Tuple

from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from utils.cli import UserError

HUB_PREFIX = 'hf:'
HUB_URL = 'https://huggingface.co'


def is_hub_reference(ref: str) -> bool:
    return str(ref).startswith(HUB_PREFIX)


def parse_hub_reference(ref: str, flag: str) -> Tuple[str, str]:
    """'hf:OWNER/REPO/FILE' (FILE may contain folders) -> ('OWNER/REPO', 'FILE')."""
    parts = ref[len(HUB_PREFIX):].split('/', 2)
    if len(parts) < 3 or not all(parts):
        raise UserError(f'{flag} {ref}: expected hf:OWNER/REPO/FILE, e.g. hf:FoundationVision/var/var_d16.pth')
    return f'{parts[0]}/{parts[1]}', parts[2]


@contextmanager
def _quiet_hub_logs():
    """huggingface_hub logs every retry of an unreachable Hub; the one-line error below says it all."""
    logger = logging.getLogger('huggingface_hub')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def resolve_checkpoint(ref: str, flag: str) -> str:
    """A local path as it is; `hf:OWNER/REPO/FILE` -> the file's path in the Hugging Face cache (downloaded once)."""
    if not is_hub_reference(ref):
        return ref
    repo_id, filename = parse_hub_reference(ref, flag)
    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return cached
    try:
        with _quiet_hub_logs():
            return hf_hub_download(repo_id, filename)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        why = 'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'the Hub cannot be reached'
        raise UserError(f'{flag} {ref}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: download '
                        f'{HUB_URL}/{repo_id}/resolve/main/{filename} and pass its local path to {flag}') from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, HfHubHTTPError) as e:
        raise UserError(f'{flag} {ref}: {str(e).strip().splitlines()[0]}') from None
