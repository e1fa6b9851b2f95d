"""Start worker functions in several CPU processes (gloo) with a deadline, and torchrun scripts on a free port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[3]
PORT_TAKEN = ("EADDRINUSE", "address already in use")


def free_port() -> int:
    """A TCP port that is free now (bound then released by the OS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(
    function: Callable[..., None], world_size: int, tmp_dir: Path, *args: Any, timeout: float = 120.0
) -> list[dict]:
    """Run ``function(rank, world_size, store_file, out_dir, *args)`` in ``world_size`` processes.

    The processes meet through a file store in ``tmp_dir`` (no port needed). Each rank writes
    ``rank<r>.json``; the list of these dicts (by rank) is returned. A process that fails raises
    (from ``ProcessContext.join``); a run that exceeds ``timeout`` raises ``RuntimeError``.
    """
    store = tmp_dir / "store"
    context = mp.start_processes(
        function,
        args=(world_size, str(store), str(tmp_dir), *args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise RuntimeError(f"The {world_size} worker processes did not finish within {timeout} s.")
    return [json.loads((tmp_dir / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def run_in_own_session(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run(command, ...)``, but in a session of its own, killed whole on timeout: killing the launcher
    alone would leave its worker processes running (and using the CPU) after the test."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def torchrun(script: Path, args: list[str], *, nproc: int = 2, timeout: float = 240.0) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torch.distributed.run`` with ``nproc`` processes on a free port.

    The port is picked just before the start; if another program takes it meanwhile, the run is
    retried once on a new port. A run that fails otherwise is also retried once, on a new port, with
    a warning that carries its output (a safety net: the one cause seen, a SIGABRT at interpreter
    exit while the gloo process group was still alive, is avoided by the workers leaving the group
    before they exit); a second failure raises with both outputs. A run that exceeds ``timeout`` is
    killed with its workers and retried once the same way (a safety net too: the one cause seen, a
    process that had finished its work waiting forever at exit when DDP's reducer freed the gloo
    group, is avoided by the example freeing its DDP wrapper before it leaves the group).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in (env.get("PYTHONPATH"), str(REPO)) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    first_failure = ""
    for attempt in range(2):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args,
        ]  # fmt: skip
        try:
            result = run_in_own_session(command, env, timeout)
        except subprocess.TimeoutExpired as expired:
            # Seen rarely on a loaded CI machine: a process that finished its work (metrics printed) does not
            # exit. Retried once, on a new port, with a warning that carries the output; a second hang raises.
            if attempt == 1:
                raise
            stdout = expired.stdout
            output = stdout.decode(errors="replace") if isinstance(stdout, bytes) else (stdout or "")
            warnings.warn(
                f"torchrun did not finish within {timeout:.0f} s; retrying. stdout:\n{output[-3000:]}", stacklevel=2
            )
            continue
        if result.returncode == 0:
            return result
        if attempt == 0:
            first_failure = result.stderr[-6000:]
            if not any(text in result.stderr for text in PORT_TAKEN):
                warnings.warn(
                    f"torchrun failed once (code {result.returncode}); retrying. stderr:\n{first_failure}", stacklevel=2
                )
    raise RuntimeError(
        f"torchrun failed twice, with code {result.returncode}.\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}\nfirst stderr:\n{first_failure}"
    )
