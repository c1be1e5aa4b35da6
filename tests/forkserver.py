"""A fork server for tests that launch the CLIs many times: it imports torch and every CLI once, then runs each
command in a forked child exactly as `python SCRIPT ARGS...` would (the script's `__main__` block, its own stdout,
stderr and exit code), a fraction of a second per launch instead of several.

The children are real processes: tests read their exit codes and kill them with real signals. The server never
runs a torch operation itself, so it holds no threads that a fork could break.

    with ForkServer() as fs:
        proc = fs.start('train.py', [...], out_dir / 'err.txt')
        proc.wait()  # -> exit code, negative signal number when killed (as subprocess)
"""
import json
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
CLI_MODULES = ('train', 'train_tokenizer', 'sampling', 'gen_img', 'evaluator', 'demo')
WARM_MODULES = ('torch.utils.tensorboard',)  # imported by the CLIs only when they run
WAIT_POLL_S = 0.01


# ---- the server (runs as `python tests/forkserver.py`) ------------------------------------------------------------
def _child(request: Dict) -> int:
    """In the forked child: redirect stdio, then run the script as __main__; returns the exit code."""
    os.setsid()  # its own process group: a test can signal the command and its data workers together
    for fd, path in ((1, request['stdout']), (2, request['stderr'])):
        target = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.chdir(request.get('cwd') or ROOT)
    os.environ.update(request.get('env') or {})
    script = str(ROOT / request['script'])
    sys.argv = [script, *request['argv']]
    try:
        runpy.run_path(script, run_name='__main__')
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        return 1


def serve():
    os.environ['OMP_NUM_THREADS'] = '1'
    sys.path.insert(0, str(ROOT))
    for name in CLI_MODULES + WARM_MODULES:
        __import__(name)
    children = {}
    print(json.dumps({'ready': os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request['op'] == 'exit':
            break
        if request['op'] == 'start':
            for path in (request['stdout'], request['stderr']):  # exist (empty) before the reply
                open(path, 'w').close()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _child(request)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children[pid] = None
            reply = {'pid': pid}
        elif request['op'] == 'poll':
            pid = request['pid']
            if children[pid] is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    children[pid] = os.waitstatus_to_exitcode(status)
            reply = {'code': children[pid]}
        else:
            reply = {'error': f'unknown op {request["op"]}'}
        print(json.dumps(reply), flush=True)


# ---- the client -----------------------------------------------------------------------------------------------------
class Child:
    """A command running under the fork server."""

    def __init__(self, server: 'ForkServer', pid: int, stdout: Path, stderr: Path):
        self.server, self.pid, self.stdout_path, self.stderr_path = server, pid, stdout, stderr
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self.returncode = self.server.request(op='poll', pid=self.pid)['code']
        return self.returncode

    def wait(self, timeout: float = 240) -> int:
        end = time.time() + timeout
        while self.poll() is None:
            if time.time() > end:
                self.kill()
                raise TimeoutError(f'{self.pid} still running after {timeout}s')
            time.sleep(WAIT_POLL_S)
        return self.returncode

    def signal(self, signum: int, group: bool = False):
        """Send `signum` to the command (with `group`, also to its data workers)."""
        try:
            os.killpg(self.pid, signum) if group else os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self):
        self.signal(signal.SIGKILL, group=True)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()


class ForkServer:
    """Client of `serve()`; a context manager that starts and stops the server process."""

    def __init__(self, env: Optional[Dict[str, str]] = None):
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, __file__], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError('the fork server did not start')

    def request(self, **kw) -> Dict:
        self.proc.stdin.write(json.dumps(kw) + '\n')
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, script: str, argv: Sequence[str], log_prefix: Path, env: Optional[Dict[str, str]] = None,
              cwd: Optional[Path] = None) -> Child:
        """Run `script argv...`; its stdout/stderr go to `log_prefix`.stdout / .stderr."""
        out, err = Path(f'{log_prefix}.stdout'), Path(f'{log_prefix}.stderr')
        reply = self.request(op='start', script=script, argv=[str(a) for a in argv], stdout=str(out),
                             stderr=str(err), env=env or {}, cwd=str(cwd) if cwd else None)
        return Child(self, reply['pid'], out, err)

    def run(self, script: str, argv: Sequence[str], log_prefix: Path, env: Optional[Dict[str, str]] = None,
            timeout: float = 240) -> Child:
        """Run to completion; returns the finished child (returncode, stdout, stderr)."""
        child = self.start(script, argv, log_prefix, env)
        child.wait(timeout)
        return child

    def close(self):
        """Ask the server to exit. Not by closing its stdin alone: a process forked from the test process (e.g. a
        DataLoader worker) may still hold the pipe's write end, so EOF could come late or never."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({'op': 'exit'}) + '\n')
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == '__main__':
    serve()
