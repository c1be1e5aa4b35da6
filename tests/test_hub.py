"""`hf:OWNER/REPO/FILE` checkpoints: resolved from a hand-built Hugging Face cache without the network, and one
line when a file is missing offline or the Hub is unreachable. Never touches the network."""
import shutil

import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

from generation import gen_img_cli
import utils.hub as hub
from tests.tiny import save_tiny_checkpoints
from utils.cli import UserError, run

REPO, REVISION = 'Owner/VIAR-tiny', 'c0ffee' + '0' * 34


def cache_file(cache, repo: str, filename: str, src=None, text: str = 'x'):
    """Place a file in the cache layout huggingface_hub writes: refs/main -> snapshots/<commit>/<file>."""
    folder = cache / f'models--{repo.replace("/", "--")}'
    (folder / 'refs').mkdir(parents=True, exist_ok=True)
    (folder / 'refs' / 'main').write_text(REVISION)
    path = folder / 'snapshots' / REVISION / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    if src is not None:
        shutil.copy(src, path)
    else:
        path.write_text(text)
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An empty cache folder; huggingface_hub reads its settings at import, so they are patched as well."""
    folder = tmp_path / 'hf-cache'
    folder.mkdir()
    monkeypatch.setenv('HF_HUB_CACHE', str(folder))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(folder))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    return folder


def no_network(*args, **kwargs):
    raise AssertionError('the network was asked for a cached file')


def test_local_paths_pass_through_and_references_are_parsed():
    assert hub.resolve_checkpoint('ckpts/viar.pth', '--ckpt') == 'ckpts/viar.pth'
    assert hub.parse_hub_reference('hf:a/b/sub/w.pth', '--ckpt') == ('a/b', 'sub/w.pth')
    for bad in ('hf:a/b', 'hf:a//w.pth', 'hf:'):
        with pytest.raises(UserError, match='expected hf:OWNER/REPO/FILE'):
            hub.resolve_checkpoint(bad, '--ckpt')


def test_cached_file_resolves_without_the_network(cache, monkeypatch):
    path = cache_file(cache, REPO, 'sub/ar.pth')
    monkeypatch.setattr(hub, 'hf_hub_download', no_network)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)     # even online, a cached file is used as it is
    assert hub.resolve_checkpoint(f'hf:{REPO}/sub/ar.pth', '--ckpt') == str(path)


def test_missing_file_offline_or_without_network_is_one_line(cache, monkeypatch):
    cache_file(cache, REPO, 'ar.pth')
    with pytest.raises(UserError) as offline:
        hub.resolve_checkpoint(f'hf:{REPO}/vae.pth', '--vae_ckpt')     # the real library, offline
    message = str(offline.value)
    assert '\n' not in message and 'HF_HUB_OFFLINE' in message and str(cache) in message
    assert f'https://huggingface.co/{REPO}/resolve/main/vae.pth' in message and 'pass its local path to --vae_ckpt' \
        in message

    def unreachable(repo_id, filename):
        raise LocalEntryNotFoundError('cannot find the requested files in the local cache')   # what it raises then

    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(hub, 'hf_hub_download', unreachable)
    with pytest.raises(UserError, match='the Hub cannot be reached: download https://huggingface.co/'):
        hub.resolve_checkpoint(f'hf:{REPO}/vae.pth', '--vae_ckpt')


def test_gen_img_runs_from_the_cache_and_fails_in_one_line(cache, tmp_path, capsys):
    ckpts = save_tiny_checkpoints(tmp_path / 'ckpts')
    cache_file(cache, REPO, 'ar.pth', src=ckpts / 'ar.pth')
    cache_file(cache, REPO, 'tok/vae.pth', src=ckpts / 'vae.pth')
    base = ['--top_k', '10', '--schedule', 'const:2', '--classes', '1', '--seeds', '0',
            '--out_dir', str(tmp_path / 'o')]
    assert run(gen_img_cli.main, gen_img_cli.get_parser(), ['--ckpt', f'hf:{REPO}/ar.pth', '--vae_ckpt',
                                                    f'hf:{REPO}/tok/vae.pth', *base]) == 0
    assert (tmp_path / 'o' / 'class1_seed0.png').is_file()
    capsys.readouterr()
    assert run(gen_img_cli.main, gen_img_cli.get_parser(), ['--ckpt', f'hf:{REPO}/ar.pth', '--vae_ckpt',
                                                    f'hf:{REPO}/vae_missing.pth', *base]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'--vae_ckpt hf:{REPO}/vae_missing.pth: not in the Hugging Face cache' in err
