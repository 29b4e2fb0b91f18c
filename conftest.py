"""Fixtures shared by the test files."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny models (on a small shared CPU, oversubscribed OpenMP threads
    stall tiny matmuls for seconds), and the global RNG state given back afterwards (training reseeds it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(before)


@pytest.fixture
def torchrun():
    """torchrun(script, *args): runs script (in the repository) under torchrun with 2 processes, one thread
    each, and Python's stack printed on a crash; asserts it exits 0 and returns the CompletedProcess."""
    def run(script, *args):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / script), *map(str, args)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc
    return run
