"""Launching this checkout's code in fresh processes, one or several (torchrun), for the tests.

Why the environment is cleaned: ``benchmark.distributed.launch_env`` takes a process's rank and
world size from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
and, failing those, from SLURM's (SLURM_PROCID, SLURM_NTASKS, ...). pytest run inside a SLURM
job (or under torchrun) would hand those to every process it starts, and to run_stage called in
the pytest process itself: a "one process" run would join the job's process group, or refuse
to start, and torchrun's workers would see the job's ranks next to their own. So the variables
are dropped, in the child's environment (``clean_env``) and in this process (``strip_launch_env``).

Every child gets one intra-op thread (OMP_NUM_THREADS=1: the tests compare runs bit for bit or
within tolerances measured with one thread a process, and several processes on the 2-core
machine would oversubscribe it), runs from the repository root, and has the root first on
PYTHONPATH, so that a script outside the repository (a driver in tmp_path, a test file run as a
worker) imports this checkout, not another copy the environment may have installed.

Several processes go through ``python -m torch.distributed.run --standalone`` (a local
rendezvous on a free port torchrun picks itself, so concurrent runs do not collide); one process
is a plain ``python``, as the grid runs a stage.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_S = 300
TAIL = 4000  # characters of a failed run's output in the failure message


def is_launch_var(name: str) -> bool:
    return name in LAUNCH_VARS or name.startswith("SLURM_")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, with one intra-op thread and the
    repository first on PYTHONPATH, and ``extra`` on top (a test hook's variable, say)."""
    env = {k: v for k, v in os.environ.items() if not is_launch_var(k)}
    path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def strip_launch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop the launcher variables from this process's environment, for the test's duration: code
    run in-process (run_stage.main) is then one process, even inside a SLURM job."""
    for k in list(os.environ):
        if is_launch_var(k):
            monkeypatch.delenv(k)


def launch_command(*args: str, nproc: int = 2) -> list[str]:
    """The command line running ``python *args`` in ``nproc`` processes; ``args`` as Python takes
    them: ``-m module ...``, ``script.py ...`` or ``-c code ...``. nproc=1: plain python."""
    if nproc == 1:
        return [sys.executable, *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if args[0] == "-c":  # torchrun starts a script or a module; code goes through the interpreter
        launcher += ["--no-python", sys.executable]
    return [*launcher, *args]


def launch(*args: str, nproc: int = 2, timeout: float = TIMEOUT_S, extra_env: dict[str, str] | None = None,
           log: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python *args`` in ``nproc`` processes (see ``launch_command``) and wait for it.

    Output is captured as text (``stdout``, ``stderr``) or, with ``log``, appended to that file
    (both streams). The environment is ``clean_env(**extra_env)``. With ``check`` a non-zero exit
    fails the test with the command and the end of its output."""
    cmd = launch_command(*args, nproc=nproc)
    env = clean_env(**(extra_env or {}))
    if log is None:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        with open(log, "ab") as out:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if check and proc.returncode != 0:
        output = proc.stdout + proc.stderr if log is None else log.read_text(errors="replace")
        shown = shlex.join(a if "\n" not in a else "<code>" for a in cmd)
        pytest.fail(f"{shown}\nexited with {proc.returncode}; the end of its output:\n{output[-TAIL:]}")
    return proc


def launch_background(*args: str, nproc: int = 2, extra_env: dict[str, str] | None = None,
                      log: Path | None = None) -> subprocess.Popen:
    """Start ``python *args`` in ``nproc`` processes without waiting (a test that kills it midway);
    output appended to ``log`` (both streams), or discarded. Environment: as ``launch``."""
    cmd = launch_command(*args, nproc=nproc)
    env = clean_env(**(extra_env or {}))
    if log is None:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
