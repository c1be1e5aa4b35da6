"""The commands of the official VIAR README and scripts/eval.sh, as they are, through the real CLIs.

The official tiny state dicts (tests/fixtures/official_tiny) are placed where the commands look for them, in a
temporary folder that stands for the repository root. Two honest departures, both explicit below: the README's
`--depth 30` becomes the fixtures' depth (2), since --depth is an assertion about the checkpoint (and `--depth 30`
on these files is tested to stop with one line), and sampling adds `--per_class 1` (10 images, not 50,000).
"""
import contextlib
import io
import os
import shlex
import shutil
import subprocess
import sys
from argparse import BooleanOptionalAction

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import evaluator_cli
from evaluation.metrics import FRECHET_METHODS
from generation import sampling_cli
from models.schedules import ConstantSchedule, LinearSchedule
from models.subnet import SubnetSpec
from tests.tiny import GOLDEN_DIR, ROOT
from training.flags import derive_plan
from utils import official
from utils.cli import ArgumentParser, UserError, run

README_SAMPLING = ('python sampling.py --ckpt_path ckpts/viar.pth --vae_ckpt ckpts/vae_ch160v4096z32.pth --cfg 1.5 '
                   '--depth 30 --sample_dir samples --use_implicit True --iter_left 10 --iter_right 10')
README_EVALUATOR = ('python evaluator.py data/VIRTUAL_imagenet256_labeled.npz '
                    'samples/implicit-viar.pth-cfg-1.5-seed-1.npz')
README_GEN_IMG = 'python gen_img.py --use_implicit --save_grid'
OFFICIAL_RUN = 'samples/implicit-viar.pth-cfg-1.5-seed-1'
FIXTURE_DEPTH, FIXTURE_CLASSES, FIXTURE_SIZE = 2, 10, 64
PER_CLASS = 1
NUM_IMAGES = FIXTURE_CLASSES * PER_CLASS
REF_IMAGES = 8
METRIC_LINES = ('FID: ', 'sFID: ', 'Precision: ', 'Recall: ')


def argv_of(command: str, depth: int = None) -> list:
    """The arguments after `python SCRIPT` of a README command, with --depth replaced when `depth` is given."""
    argv = shlex.split(command)[2:]
    if depth is not None:
        argv[argv.index('--depth') + 1] = str(depth)
    return argv


def place_official_files(root, viar_classes: int = FIXTURE_CLASSES):
    """ckpts/{viar,var_d2,vae_ch160v4096z32}.pth from the official fixtures; with `viar_classes`, the VIAR's class
    table widened (rows 0-9 and the null row kept, the new rows copies of them) so that e.g. class 970 exists."""
    ckpts = root / 'ckpts'
    ckpts.mkdir(parents=True)
    shutil.copy(GOLDEN_DIR / 'vae.pth', ckpts / 'vae_ch160v4096z32.pth')
    shutil.copy(GOLDEN_DIR / 'var.pth', ckpts / f'var_d{FIXTURE_DEPTH}.pth')
    sd = torch.load(GOLDEN_DIR / 'viar.pth', map_location='cpu', weights_only=True)
    table = sd['class_emb.weight']
    if viar_classes != FIXTURE_CLASSES:
        rows = torch.arange(viar_classes) % FIXTURE_CLASSES
        sd['class_emb.weight'] = torch.cat([table[rows], table[FIXTURE_CLASSES:]])
    torch.save(sd, ckpts / 'viar.pth')
    return root


def launch(forkserver, cwd, script: str, argv: list, tag: str):
    """Run `python SCRIPT ARGV` with `cwd` as the working folder; the finished child."""
    child = forkserver.start(script, argv, cwd / f'.{tag}', cwd=cwd)
    child.wait()
    return child


def readme_evaluator(cwd, monkeypatch) -> str:
    """The README's evaluator command in `cwd`, in-process; ADM's scipy Fréchet distance (half a minute per 2048-d
    matrix square root on one core) is swapped for the same distance through eigendecompositions."""
    monkeypatch.chdir(cwd)
    monkeypatch.setitem(FRECHET_METHODS, 'scipy', FRECHET_METHODS['eigh'])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run(evaluator_cli.main, evaluator_cli.get_parser(), argv_of(README_EVALUATOR) + ['--no-progress']) == 0
    return out.getvalue()


@pytest.fixture(scope='module')
def repo(tmp_path_factory, forkserver):
    """A repository root with the official files, after the README sampling command ran in it."""
    root = place_official_files(tmp_path_factory.mktemp('repo'))
    (root / 'data').mkdir()
    rng = np.random.default_rng(0)
    np.savez(root / 'data' / 'VIRTUAL_imagenet256_labeled.npz',
             arr_0=rng.integers(0, 256, (REF_IMAGES, FIXTURE_SIZE, FIXTURE_SIZE, 3), dtype=np.uint8))
    child = launch(forkserver, root, 'sampling.py', argv_of(README_SAMPLING, FIXTURE_DEPTH) + ['--per_class',
                                                                                                str(PER_CLASS)], 'run')
    assert child.returncode == 0, child.stderr
    return root


def test_readme_sampling_writes_the_official_paths(repo):
    run_dir = repo / OFFICIAL_RUN
    assert sorted(p.name for p in run_dir.glob('*.png')) == [f'{i:06d}.png' for i in range(NUM_IMAGES)]
    with np.load(repo / f'{OFFICIAL_RUN}.npz') as f:
        images = f['arr_0']
    assert images.shape == (NUM_IMAGES, FIXTURE_SIZE, FIXTURE_SIZE, 3) and images.dtype == np.uint8
    assert np.array_equal(images[7], np.asarray(Image.open(run_dir / '000007.png')))
    assert (repo / f'{OFFICIAL_RUN}.json').is_file()


def test_readme_evaluator_reads_the_official_npz(repo, monkeypatch):
    lines = readme_evaluator(repo, monkeypatch).splitlines()
    for label in METRIC_LINES:
        values = [line[len(label):] for line in lines if line.startswith(label)]
        assert len(values) == 1 and np.isfinite(float(values[0])), lines


def test_readme_depth_30_is_an_assertion_on_the_checkpoint(repo, forkserver):
    child = launch(forkserver, repo, 'sampling.py', argv_of(README_SAMPLING), 'depth30')
    assert child.returncode == 2
    assert child.stderr.strip() == ('sampling.py: error: ckpts/viar.pth has depth=2, but --depth 30 was given'), \
        child.stderr


def test_use_implicit_values(repo, forkserver):
    base = argv_of(README_SAMPLING, FIXTURE_DEPTH)
    i = base.index('--use_implicit')
    for spelling in (['--use_implicit=True'], ['--use_implicit'], ['--use_implicit', 'true']):
        child = launch(forkserver, repo, 'sampling.py', base[:i] + spelling + base[i + 2:] + ['--dry_run'], 'dry')
        assert child.returncode == 0 and child.stdout == f'{OFFICIAL_RUN}.npz\n', child.stderr
    # False means false here (the official type=bool read it as true): VIAR weights then stop with one line.
    child = launch(forkserver, repo, 'sampling.py', base[:i] + ['--use_implicit', 'False'] + base[i + 2:], 'false')
    assert child.returncode == 2 and 'is a VIAR (implicit) checkpoint' in child.stderr
    assert child.stderr.count('\n') == 1
    var = ['--ckpt_path', f'ckpts/var_d{FIXTURE_DEPTH}.pth', '--vae_ckpt', 'ckpts/vae_ch160v4096z32.pth',
           '--depth', str(FIXTURE_DEPTH), '--use_implicit', 'False', '--dry_run']
    child = launch(forkserver, repo, 'sampling.py', var, 'var')
    assert child.returncode == 0 and child.stdout == f'samples/d{FIXTURE_DEPTH}-var_d2.pth-cfg-1.5-seed-1.npz\n'


def test_bool_values_on_any_cli():
    p = ArgumentParser(prog='tool')
    p.add_argument('--flag', action=BooleanOptionalAction, default=None)
    p.add_argument('rest', nargs='*')
    for argv, want in ((['--flag', 'True'], True), (['--flag=False'], False), (['--flag', 'false'], False),
                       (['--flag'], True), (['--no-flag'], False), ([], None), (['--flag', '1'], True)):
        assert p.parse_args(argv).flag is want, argv
    assert p.parse_args(['--flag', 'x.npz']).rest == ['x.npz']


def test_official_names():
    assert official.sample_run_name('ckpts/var_d30.pth', False, 30, 1.5, 1) == 'd30-var_d30.pth-cfg-1.5-seed-1'
    assert official.sample_run_name('/a/viar.pth', True, 30, 2, 1) == 'implicit-viar.pth-cfg-2.0-seed-1'
    assert official.grid_name('class', [970], [10, 11, 12]) == 'class970_seeds10_11_12_grid.png'
    assert official.grid_name('class', [970], list(range(10, 20))) == 'class970_seeds10_11_12_13_etc10_grid.png'


def test_knobs_the_official_name_cannot_express_get_their_own_names():
    parse = sampling_cli.get_parser().parse_args
    official_knobs = (parse([]), LinearSchedule(10, 10), None)
    variants = [
        (parse(['--iter_left', '10', '--iter_right', '5']), LinearSchedule(10, 5), None),
        (parse(['--schedule', 'const:10']), ConstantSchedule(10), None),
        (parse(['--kv_policy', 'lean']), LinearSchedule(10, 10), None),
        (parse(['--solver', 'anderson']), LinearSchedule(10, 10), None),
        (parse(['--kv_policy', 'lean', '--solver', 'anderson']), LinearSchedule(10, 10), None),
        (parse(['--top_k', '10']), LinearSchedule(10, 10), None),
        (parse(['--top_p', '0.9']), LinearSchedule(10, 10), None),
        (parse(['--more_smooth']), LinearSchedule(10, 10), None),
    ]
    names = [official.non_official_knobs(args, True, schedule, subnet) for args, schedule, subnet in variants]
    assert official.non_official_knobs(*official_knobs[:1], True, *official_knobs[1:]) == []
    assert all(names) and len({tuple(n) for n in names}) == len(names), names
    assert names[0] == ['linear10-5']
    explicit = [official.non_official_knobs(parse([]), False, None, s)
                for s in (None, SubnetSpec(16, 6, 'equidistant'), SubnetSpec(16, 6, 'nested'))]
    assert explicit[0] == [] and len({tuple(n) for n in explicit}) == 3


def test_official_name_resume_refuses_other_settings(repo, forkserver):
    argv = argv_of(README_SAMPLING, FIXTURE_DEPTH) + ['--per_class', str(PER_CLASS + 1)]
    child = launch(forkserver, repo, 'sampling.py', argv, 'resume')
    assert child.returncode == 2 and 'other settings (per_class)' in child.stderr, child.stderr
    with np.load(repo / f'{OFFICIAL_RUN}.npz') as f:
        assert len(f['arr_0']) == NUM_IMAGES


def test_eval_sh_samples_and_evaluates_the_official_paths(repo, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHON': sys.executable, 'NPROC': '1',
           'CKPT': str(repo / 'ckpts' / 'viar.pth'), 'VAE': str(repo / 'ckpts' / 'vae_ch160v4096z32.pth'),
           'SAMPLE_DIR': str(tmp_path), 'EVAL_ARGS': '--fid-method eigh --no-progress'}
    r = subprocess.run(['bash', str(ROOT / 'scripts' / 'eval.sh'), str(repo / 'data' / 'VIRTUAL_imagenet256_labeled.npz'),
                        '--per_class', '1'], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(tmp_path / 'implicit-viar.pth-cfg-1.5-seed-1.npz') as f:
        assert f['arr_0'].shape == (FIXTURE_CLASSES, FIXTURE_SIZE, FIXTURE_SIZE, 3)
    assert all(any(line.startswith(label) for line in r.stdout.splitlines()) for label in METRIC_LINES), r.stdout


def test_readme_gen_img_and_official_flags(tmp_path, forkserver):
    root = place_official_files(tmp_path, viar_classes=1000)
    child = launch(forkserver, root, 'gen_img.py', argv_of(README_GEN_IMG), 'readme')
    assert child.returncode == 0, child.stderr
    out = root / 'gen_images' / 'viar'
    seeds = range(10, 20)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f'class970_seed{s}.png' for s in seeds] + ['class970_seeds10_11_12_13_etc10_grid.png'])
    grid = np.asarray(Image.open(out / 'class970_seeds10_11_12_13_etc10_grid.png'))
    pad = 2
    assert grid.shape == (3 * (FIXTURE_SIZE + pad) + pad, 4 * (FIXTURE_SIZE + pad) + pad, 3)  # 10 images, 4 a row

    argv = ['--var_ckpt', 'ckpts/viar.pth', '--vae_ckpt', 'ckpts/vae_ch160v4096z32.pth', '--use_implicit',
            '--class_label', '970', '--seeds', '10', '11', '12', '--cfg', '1.5', '--top_k', '900', '--top_p', '0.96',
            '--output_dir', 'mine', '--save_grid', '--nrow', '3']
    child = launch(forkserver, root, 'gen_img.py', argv, 'flags')
    assert child.returncode == 0, child.stderr
    mine = root / 'mine' / 'viar'
    assert sorted(p.name for p in mine.iterdir()) == [
        'class970_seed10.png', 'class970_seed11.png', 'class970_seed12.png', 'class970_seeds10_11_12_grid.png']
    assert np.asarray(Image.open(mine / 'class970_seeds10_11_12_grid.png')).shape[:2] == (
        FIXTURE_SIZE + 2 * pad, 3 * (FIXTURE_SIZE + pad) + pad)
    for s in (10, 11, 12):  # an image depends on its seed only
        assert np.array_equal(np.asarray(Image.open(mine / f'class970_seed{s}.png')),
                              np.asarray(Image.open(out / f'class970_seed{s}.png')))

    # Without a checkpoint, --depth alone asks for VAR, as the official script: ckpts/var_d<depth>.pth.
    child = launch(forkserver, root, 'gen_img.py', ['--depth', str(FIXTURE_DEPTH), '--class_label', '3', '--seeds',
                                                    '1', '--save_grid'], 'var')
    assert child.returncode == 0, child.stderr
    assert [p.name for p in (root / 'gen_images' / f'var_d{FIXTURE_DEPTH}').iterdir()] == ['class3_seed1.png']


# Every field of the official Args (utils/arg_util.py) a user sets, with its official default, as Tap spells it.
OFFICIAL_TRAIN_ARGS = (
    '--data_path=/data/imagenet --exp_name=text --use_implicit=False --p_depth=5 --vfast=0 --tfast=0 --depth=16 '
    '--ini=-1 --hd=0.02 --aln=0.5 --alng=1e-5 --fp16=0 --tblr=1e-4 --twd=0.05 --twde=0 --tclip=2.0 --ls=0.0 --bs=768 '
    '--ac=1 --save_freq=5 --ep=250 --wp=0 --wp0=0.005 --wpe=0.01 --sche=lin0 --opt=adamw --afuse=True --saln=False '
    '--anorm=True --fuse=True --pn=1_2_3_4_5_6_8_10_13_16 --patch_size=16 --mid_reso=1.125 --hflip=False --workers=0 '
    '--pg=0.0 --pg0=4 --pgwp=0 --local_out_dir_path=local_output --tf32=True --seed=1 --same_seed_for_all_ranks=0')
TRAIN_SH = ('--data_path=/data/imagenet --depth=30 --bs=512 --ep=550 --tblr=8e-5 --fp16=1 --alng=1e-5 --wpe=0.01 '
            '--twde=0.08 --use_implicit=True --p_depth=5')


def test_official_train_flags():
    from training import train_cli
    parser = train_cli.get_parser()
    for command in (OFFICIAL_TRAIN_ARGS, OFFICIAL_TRAIN_ARGS.replace('=', ' '), TRAIN_SH):
        args, unknown = parser.parse_known_args(shlex.split(command))
        assert unknown == [], unknown
    args = parser.parse_args(shlex.split(OFFICIAL_TRAIN_ARGS))
    assert args.weight_decay_end == 0 and derive_plan(args, 1, 1000, 'cpu').wd_end == 0.05  # official: 0 means --twd
    args = parser.parse_args(shlex.split(TRAIN_SH))
    assert args.use_implicit and args.p_depth == 5 and args.base_lr == 8e-5 and args.precision == 'fp16'
    assert official.apply_official_train_flags(args, 256, (1, 2, 16)) == []
    args = parser.parse_args(shlex.split(TRAIN_SH + ' --tfast=2 --exp_name=run1 --fuse False'))
    notes = official.apply_official_train_flags(args, 256, (1, 2, 16))
    assert args.compile and len(notes) == 3 and 'run1' in notes[0]
    for extra, message in ((' --pg=0.8', 'progressive training'), (' --patch_size=8', '16 px per token'),
                           (' --same_seed_for_all_ranks=1', 'only 0')):
        with pytest.raises(UserError, match=message):
            official.apply_official_train_flags(parser.parse_args(shlex.split(TRAIN_SH + extra)), 256, (1, 2, 16))
