"""README.md's commands as a reader copies them: the Hugging Face example runs as written (on a local copy of a
SmolLM2 model, since the tests download nothing from the Hub), and every file and flag it names exists."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_short():
    assert len(README.splitlines()) <= 260


def test_hf_example_runs_as_written(smollm2, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    code = re.search(r"## GIFT on your own Hugging Face model.*?```python\n(.*?)```", README, re.S).group(1)
    name = re.search(r'^name = "([^"]+)"', code, re.M).group(1)
    code = code.replace(f'"{name}"', repr(str(smollm2)))  # the same architecture, from the local cache
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable params: 147,456" in proc.stdout  # 2 Thetas of 2 x 64 x 576
    assert (tmp_path / "adapter.safetensors").stat().st_size < 600 * 1024
    assert (tmp_path / "smollm2-gift" / "config.json").is_file()


def test_files_and_flags_named_in_the_readme_exist():
    for name in set(re.findall(r"`([a-z_]+\.py)`", README)) | set(re.findall(r"python ([a-z_]+\.py)", README)):
        assert (ROOT / name).is_file(), name
    for doc in re.findall(r"\]\((docs/[^)]+)\)", README):
        assert (ROOT / doc).is_file(), doc
    for script in ("train_vit.py", "train_llama.py", "train_glue.py"):
        help_text = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                                   timeout=60).stdout
        for flag in ("--method", "--targets", "--rank", "--share", "--lora-alpha", "--adapter", "--merge",
                     "--eval-only", "--out", "--resume", "--stop-after", "--seed", "--device", "--precision",
                     "--compile", "--demo"):
            assert flag in help_text, (script, flag)
