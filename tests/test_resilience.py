"""Training survives what shared clusters do to it: SIGKILL at random moments (some inside a checkpoint write),
SIGTERM preemption, a changed number of ranks on resume, a dead rank, corrupt checkpoints and non-finite losses."""
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from models import VARConfig, build_var
from tests.test_train import DETERMINISTIC, TINY_MODEL, TINY_RUN
from tests.tiny import ROOT
from tests.train_helpers import data_args, kill_tree, launch, load_weights, read_log, subprocess_env
from training import ar_trainer, train_cli
from training.amp import AmpOptimizer
from training.checkpoints import CheckpointFiles
from training.stopping import StopSignal
from utils.checkpoint import load_file
from utils.cli import run

from tests.train_helpers import one_thread  # noqa: F401  (fixture)

TOTAL = 36                 # iterations of the killed-and-resumed runs (12 epochs of 3)
SAVE_EVERY = 2             # --save_steps: the most progress a kill may lose
KILLS = 10
MID_SAVE_EVERY = 3         # kills 1, 4, 7, ... land inside a checkpoint write
SAVE_DELAY_S = 0.4         # how long a test-slowed checkpoint write stays open (VIAR_TEST_SAVE_DELAY)
STEP_S = 0.15              # about one tiny training step here: random kills fall anywhere within it
KILL_SEED = 2024
EXIT_TIMEOUT_S = 60        # a job with a dead rank must end within this
# Label dropout, drop path, per-rank S-JFB draws and flips all draw random numbers: resuming must restore them all.
STOCHASTIC_RUN = ['--hflip', '--workers', '0', '--max_steps', str(TOTAL), '--save_steps', str(SAVE_EVERY)]
LOGGED_ITER = re.compile(r' it \d+/\d+ \((\d+)\) \|')


def train_args(data, out_dir, *extra):
    return data_args(data, out_dir, *TINY_MODEL, *TINY_RUN, *extra)


def logged(text: str) -> int:
    """The last iteration a run logged (0 if none)."""
    found = LOGGED_ITER.findall(text)
    return int(found[-1]) if found else 0


def wait_for(condition, child, timeout: float = 120):
    end = time.time() + timeout
    while not condition():
        assert child.poll() is None, f'the run ended early (exit {child.returncode}):\n{child.stderr[-2000:]}'
        assert time.time() < end, 'timed out'
        time.sleep(0.005)


def newest(files: CheckpointFiles) -> int:
    numbered = files.numbered()
    return numbered[-1][0] if numbered else 0


@pytest.fixture(scope='module')
def straight(forkserver, data, tmp_path_factory):
    """Final weights of an uninterrupted run."""
    out = tmp_path_factory.mktemp('straight')
    child = forkserver.run('train.py', train_args(data, out, *STOCHASTIC_RUN), out / 'cli')
    assert child.returncode == 0, child.stderr
    return load_weights(out / 'ar-ckpt-last.pth')


def test_sigkill_at_random_moments_loses_at_most_one_save_interval(forkserver, data, straight, tmp_path):
    out = tmp_path / 'run'
    files = CheckpointFiles(out, 'ar')
    rng = random.Random(KILL_SEED)
    mid_save_kills = 0
    for k in range(KILLS):
        mid_save = k % MID_SAVE_EVERY == 1
        start = newest(files)
        child = forkserver.start('train.py', train_args(data, out, *STOCHASTIC_RUN), tmp_path / f'run{k}',
                                 env={'VIAR_TEST_SAVE_DELAY': str(SAVE_DELAY_S)} if mid_save else None)
        if mid_save:  # inside the write of a checkpoint: its temp file exists
            wait_for(lambda: any(out.glob('.ar-ckpt-*.tmp')), child)
            time.sleep(rng.uniform(0, SAVE_DELAY_S / 2))
        else:  # a few iterations in, then anywhere within a step, a log line or a save
            target = start + rng.randint(1, 3)
            wait_for(lambda: logged(child.stdout) >= target, child)
            time.sleep(rng.uniform(0, STEP_S))
        child.kill()
        assert child.wait() == -signal.SIGKILL, f'kill {k} came too late: the run had finished'
        if mid_save:
            assert any(out.glob('.ar-ckpt-*.tmp')), f'kill {k} missed the checkpoint write'
            mid_save_kills += 1
        # The newest checkpoint loads, `last` loads, and at most one save interval of progress is lost.
        it = newest(files)
        if it:
            assert load_file(files.at(it))['it'] == it
            assert load_file(files.last)['it'] <= it
        assert logged(child.stdout) - it <= SAVE_EVERY, (k, logged(child.stdout), it)
    assert mid_save_kills >= 3

    child = forkserver.run('train.py', train_args(data, out, *STOCHASTIC_RUN), tmp_path / 'final')
    assert child.returncode == 0, child.stderr
    resumed = load_weights(out / 'ar-ckpt-last.pth')
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # One log entry per iteration, none lost or duplicated by the restarts; the temp files of killed saves are gone.
    assert [r['step'] for r in read_log(out) if 'train/L_mean' in r] == list(range(1, TOTAL + 1))
    assert not list(out.glob('.*.tmp'))
    assert [i for i, _ in files.numbered()] == [TOTAL - SAVE_EVERY, TOTAL]  # --keep_last 2


def test_sigterm_saves_then_resume_is_exact(forkserver, data, straight, tmp_path):
    out = tmp_path / 'run'
    # With a data worker, signalled together with the trainer as a scheduler or Ctrl-C does.
    child = forkserver.start('train.py', train_args(data, out, *STOCHASTIC_RUN, '--workers', '1'), tmp_path / 'term')
    wait_for(lambda: logged(child.stdout) >= 5, child)
    child.signal(signal.SIGTERM, group=True)
    assert child.wait(EXIT_TIMEOUT_S) == 128 + signal.SIGTERM
    stopped = logged(child.stdout)
    assert f'SIGTERM: stopped after saving iteration {stopped}; run the same command to resume' in child.stdout
    assert newest(CheckpointFiles(out, 'ar')) == stopped and 'Traceback' not in child.stderr
    child = forkserver.run('train.py', train_args(data, out, *STOCHASTIC_RUN), tmp_path / 'resume')
    assert child.returncode == 0, child.stderr
    resumed = load_weights(out / 'ar-ckpt-last.pth')
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_stop_signal_first_asks_second_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested(torch.device('cpu')) == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
    assert signal.getsignal(signal.SIGTERM) is before


def _torchrun(args, out: Path) -> subprocess.Popen:
    return subprocess.Popen(launch('train.py', args, nproc=2), cwd=ROOT, env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_logged(proc: subprocess.Popen, out: Path, it: int):
    end = time.time() + 240
    while time.time() < end:
        if (out / 'log.txt').is_file() and any(r.get('step', 0) >= it for r in read_log(out)):
            return
        assert proc.poll() is None, f'torchrun ended early (exit {proc.returncode})'
        time.sleep(0.05)
    raise TimeoutError


def test_sigterm_under_torchrun_then_resume_on_one_rank(forkserver, data, tmp_path):
    run_flags = [*DETERMINISTIC, '--max_steps', '12', '--save_steps', '4']
    out = tmp_path / 'run'
    proc = _torchrun(train_args(data, out, *run_flags), out)
    try:
        _wait_logged(proc, out, 3)
        proc.send_signal(signal.SIGTERM)  # to the launcher: it passes the signal on to both ranks
        proc.wait(EXIT_TIMEOUT_S)
    finally:
        kill_tree(proc.pid)
    text = (out / 'stdout.txt').read_text()
    stopped = int(re.search(r'SIGTERM: stopped after saving iteration (\d+)', text).group(1))
    assert 3 <= stopped < 12 and f'at iteration {stopped}; weights sha256' in text  # both ranks saved together
    assert load_file(CheckpointFiles(out, 'ar').at(stopped))['world'] == 2

    # Resumed on one rank: the global batch and the data order are unchanged, so it continues correctly.
    child = forkserver.run('train.py', train_args(data, out, *run_flags), tmp_path / 'resume')
    assert child.returncode == 0, child.stderr
    assert 'written by 2 rank(s), this run has 1: same global batch' in (out / 'stdout.txt').read_text()
    one = tmp_path / 'one'
    assert forkserver.run('train.py', train_args(data, one, *run_flags), tmp_path / 'one').returncode == 0
    a, b = load_weights(one / 'ar-ckpt-last.pth'), load_weights(out / 'ar-ckpt-last.pth')
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # A number of ranks or batch size that changes the images per step stops with one line, touching nothing.
    before = {p.name: p.read_bytes() for p in out.glob('ar-ckpt-*.pth')}
    child = forkserver.run('train.py', train_args(data, out, *run_flags, '--bs', '6', '--max_steps', '16'),
                           tmp_path / 'bs6')
    assert child.returncode == 2 and child.stderr.count('\n') == 1, child.stderr
    assert 'trained with 8 images per step (1 rank(s) x 8 x 1 accumulation), this run would use 6' in child.stderr
    assert {p.name: p.read_bytes() for p in out.glob('ar-ckpt-*.pth')} == before


def test_a_dead_rank_ends_the_job_in_bounded_time(data, tmp_path):
    out = tmp_path / 'run'
    proc = _torchrun(train_args(data, out, *DETERMINISTIC, '--ep', '1000'), out)
    try:
        _wait_logged(proc, out, 2)
        children = [int(p) for p in Path(f'/proc/{proc.pid}/task/{proc.pid}/children').read_text().split()]
        ranks = {int(re.search(rb'\x00RANK=(\d+)\x00', b'\x00' + Path(f'/proc/{p}/environ').read_bytes()).group(1)): p
                 for p in children}
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.time()
        code = proc.wait(EXIT_TIMEOUT_S)
        took = time.time() - killed_at
        survivor_gone = not _alive(ranks[0])
    finally:
        kill_tree(proc.pid)
    assert code != 0 and took < EXIT_TIMEOUT_S and survivor_gone, (code, took)


def _alive(pid: int) -> bool:
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


# ---- in-process: checkpoint fallback and non-finite losses ---------------------------------------------------------
@pytest.mark.usefixtures('one_thread')
def test_resume_falls_back_past_a_corrupt_checkpoint(data, tmp_path, capsys):
    out = tmp_path / 'run'
    args = train_args(data, out, '--workers', '0', '--save_steps', '2')
    assert run(train_cli.main, train_cli.get_parser(), [*args, '--max_steps', '6']) == 0
    files = CheckpointFiles(out, 'ar')
    assert [i for i, _ in files.numbered()] == [4, 6] and files.last.samefile(files.at(6))
    six = files.at(6).read_bytes()
    files.at(6).write_bytes(six[:len(six) // 3])  # e.g. a copy cut short; `last` is the same file
    assert run(train_cli.main, train_cli.get_parser(), [*args, '--max_steps', '8']) == 0
    log = (out / 'stdout.txt').read_text()
    assert f'{files.at(6)}: truncated or corrupt checkpoint' in log and 'falling back to an older checkpoint' in log
    assert f'resumed from {files.at(4)} at iteration 4' in log
    assert [i for i, _ in files.numbered()] == [6, 8] and load_file(files.at(6))['it'] == 6
    # Nothing loads: one line, no fresh start over the run.
    for _, path in files.numbered():
        path.write_bytes(b'\x00' * 10)
    capsys.readouterr()
    assert run(train_cli.main, train_cli.get_parser(), [*args, '--max_steps', '10']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'none of the 2 checkpoint(s)' in err and '--resume none' in err, err


def _nan_on(iterations):
    """Patch ARTrainer.step so that the loss of the given (1-based) iterations is NaN."""
    step, losses = ar_trainer.ARTrainer.step, ar_trainer.token_losses

    def patched(self, it, batch, stepping, want_metrics):
        if it + 1 not in iterations:
            return step(self, it, batch, stepping, want_metrics)
        with mock.patch.object(ar_trainer, 'token_losses', lambda *a, **k: losses(*a, **k) * float('nan')):
            return step(self, it, batch, stepping, want_metrics)
    return mock.patch.object(ar_trainer.ARTrainer, 'step', patched)


@pytest.mark.usefixtures('one_thread')
def test_nonfinite_losses_skip_steps_then_stop(data, tmp_path, capsys):
    args = ['--workers', '0', '--save_steps', '2', '--keep_last', '5', '--max_nonfinite', '3']
    out = tmp_path / 'transient'
    with _nan_on({3, 4}):
        assert run(train_cli.main, train_cli.get_parser(), train_args(data, out, *args, '--max_steps', '6')) == 0
    files = CheckpointFiles(out, 'ar')
    weights = {i: load_file(p)['model'] for i, p in files.numbered()}
    assert all(torch.equal(weights[2][k], weights[4][k]) for k in weights[2])   # the skipped steps changed nothing
    assert not all(torch.equal(weights[4][k], weights[6][k]) for k in weights[4])
    log = (out / 'stdout.txt').read_text()
    assert 'non-finite loss (nan) at iteration 3: its optimizer step is skipped (1 in a row' in log
    assert '1 step(s) skipped (non-finite gradients)' in log
    assert [r['opt/skipped_steps'] for r in read_log(out) if 'opt/skipped_steps' in r][-1] == 2
    # The count lives in the checkpoint: a resumed run goes on from it (the curve does not drop back to 0).
    assert run(train_cli.main, train_cli.get_parser(), train_args(data, out, *args, '--max_steps', '8')) == 0
    assert {r['opt/skipped_steps'] for r in read_log(out) if r.get('step', 0) > 6 and 'opt/skipped_steps' in r} == {2}

    out = tmp_path / 'persistent'
    capsys.readouterr()
    with _nan_on(set(range(5, 100))):
        assert run(train_cli.main, train_cli.get_parser(), train_args(data, out, *args, '--max_steps', '12')) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'the loss is nan at iteration 5 and stayed non-finite for 3 iterations' in err
    last = load_file(CheckpointFiles(out, 'ar').last)
    good = load_file(CheckpointFiles(out, 'ar').at(4))['model']
    assert last['it'] == 6 and all(torch.equal(good[k], last['model'][k]) for k in good)
    params = {name for name, _ in build_var(VARConfig.from_dict(last['config'])).named_parameters()}
    assert all(torch.isfinite(last['model'][name]).all() for name in params)


def test_fp16_overflow_skips_the_step_and_counts_it():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    amp = AmpOptimizer(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    amp.scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 11)  # what fp16 runs on CUDA use
    before = [p.detach().clone() for p in model.parameters()]
    norm, scale_log2 = amp.backward_step(model(torch.randn(2, 4)).sum() * float('inf'), stepping=True)
    assert not torch.isfinite(norm) and scale_log2 == 10 and amp.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    norm, _ = amp.backward_step(model(torch.randn(2, 4)).sum(), stepping=True)
    assert torch.isfinite(norm) and amp.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # Without a scaler (fp32, bf16) a NaN gradient skips the step as well, instead of poisoning the weights.
    fp32 = AmpOptimizer(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    now = [p.detach().clone() for p in model.parameters()]
    fp32.backward_step(model(torch.randn(2, 4)).sum() * float('nan'), stepping=True)
    assert fp32.skipped_steps == 1 and all(torch.equal(a, b) for a, b in zip(now, model.parameters()))
