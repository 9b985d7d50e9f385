"""``bft-megatron convert import|export`` as a user runs it (fresh processes), and its error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.convert_models import make_model, read_safetensors_dir

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args: str, python_warnings: str | None = "ignore") -> subprocess.CompletedProcess:
    """``python_warnings=None``: Python's default warning filters, as a user's shell has them."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS=python_warnings or "")
    if python_warnings is None:
        del env["PYTHONWARNINGS"]
    return subprocess.run([sys.executable, "-m", "bft_megatron.cli", "convert", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_import_then_export_round_trip(tmp_path):
    hf, ckpt, out = (str(tmp_path / d) for d in ("hf", "ckpt", "out"))
    make_model("qwen2_untied_bf16", hf, max_shard_size="60KB")
    assert os.path.isfile(os.path.join(hf, "model.safetensors.index.json"))  # a sharded source
    res = _cli("import", "--hf", hf, "--out", ckpt, python_warnings=None)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Warning:" not in res.stderr, res.stderr  # megatron's apex/TE notices, torch's deprecations: hidden
    assert open(os.path.join(ckpt, "latest")).read().strip() == "iter_0000000"
    res = _cli("export", "--ckpt", ckpt, "--out", out, "--max-shard-size", "50KB", "--dtype", "fp32",
               python_warnings=None)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Warning:" not in res.stderr, res.stderr
    src, got = read_safetensors_dir(hf), read_safetensors_dir(out)
    assert sorted(src) == sorted(got)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], src[k].float()) for k in src)
    with open(os.path.join(out, "config.json")) as fh:
        assert json.load(fh)["dtype"] == "float32"


def test_cli_import_names_missing_and_unmapped_tensors(tmp_path):
    hf = str(tmp_path / "hf")
    make_model("llama31_untied", hf)
    path = os.path.join(hf, "model.safetensors")
    original = load_file(path)
    missing = {k: v for k, v in original.items() if k != "model.layers.0.mlp.up_proj.weight"}
    save_file(missing, path, metadata={"format": "pt"})
    res = _cli("import", "--hf", hf, "--out", str(tmp_path / "ckpt"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "model.layers.0.mlp.up_proj.weight" in res.stderr and "not found" in res.stderr
    assert os.listdir(tmp_path / "ckpt") == []  # the failed import removed its iter_0000000: a retry may go there
    extra = dict(original, **{"model.layers.1.self_attn.o_proj.bias": torch.zeros(64)})  # not a Llama parameter
    save_file(extra, path, metadata={"format": "pt"})
    res = _cli("import", "--hf", hf, "--out", str(tmp_path / "ckpt2"))
    assert res.returncode == 2 and "model.layers.1.self_attn.o_proj.bias" in res.stderr
    assert "no megatron mapping" in res.stderr


def test_cli_import_names_the_hf_config_file_not_a_training_field(tmp_path):
    """An unsupported HF model is named by its config.json (the file the user gave), not by ``model.from_hf``,
    a training config's field the convert command has none of."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["GemmaForCausalLM"]}))
    res = _cli("import", "--hf", str(hf), "--out", str(tmp_path / "ckpt"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"{hf}/config.json: architectures ['GemmaForCausalLM']: Gemma 1 is not supported" in res.stderr
    assert "model.from_hf" not in res.stderr


def test_cli_import_refuses_a_directory_that_holds_checkpoints(tmp_path):
    """Importing into a training run's checkpoint.save would move its ``latest`` to the weights-only import (the
    next resume then fails, an export exports the import): refused, like an export into a directory with weights."""
    hf, run = str(tmp_path / "hf"), tmp_path / "run"
    make_model("llama32_tied", hf)
    (run / "iter_0000120").mkdir(parents=True)
    (run / "iter_0000120" / "metadata.json").write_text("{}")
    (run / "latest").write_text("iter_0000120\n")
    res = _cli("import", "--hf", hf, "--out", str(run))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "already holds a checkpoint (a 'latest' pointer to iter_0000120" in res.stderr
    assert "import into a new directory" in res.stderr
    assert (run / "latest").read_text() == "iter_0000120\n"
    assert sorted(os.listdir(run)) == ["iter_0000120", "latest"]
    (run / "latest").unlink()  # an iter_ directory alone (an unfinished save or import) is refused too
    res = _cli("import", "--hf", hf, "--out", str(run))
    assert res.returncode == 2 and "1 iter_ directory (iter_0000120) but no 'latest' pointer" in res.stderr
    assert sorted(os.listdir(run)) == ["iter_0000120"]


def _files(path: str) -> dict[str, bytes]:
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_cli_no_progress_hides_the_bars_and_changes_no_file(tmp_path):
    """The bars (on by default, as prepare's, also when stderr is a pipe) only report: the exports of imports
    made with and without ``--no-progress`` are the same bytes, file by file."""
    hf = str(tmp_path / "hf")
    make_model("llama31_untied", hf, max_shard_size="60KB")
    exports = {}
    for label, flag in (("bars", []), ("quiet", ["--no-progress"])):
        ckpt, out = str(tmp_path / f"ckpt_{label}"), str(tmp_path / f"out_{label}")
        imp = _cli("import", "--hf", hf, "--out", ckpt, *flag)
        assert imp.returncode == 0, imp.stderr[-3000:]
        exp = _cli("export", "--ckpt", ckpt, "--out", out, "--max-shard-size", "50KB", *flag)
        assert exp.returncode == 0, exp.stderr[-3000:]
        shown = [bar in imp.stderr + exp.stderr for bar in ("import: read HF", "import: write", "export:")]
        assert shown == [not flag] * 3, imp.stderr[-2000:] + exp.stderr[-2000:]
        assert ("exported layers 0.." in exp.stderr) == bool(flag)  # the log line stands in for the bar
        exports[label] = _files(out)
    assert len(exports["bars"]) > 5 and exports["bars"] == exports["quiet"]
    assert _files(os.path.join(tmp_path / "ckpt_bars", "hf")) == _files(os.path.join(tmp_path / "ckpt_quiet", "hf"))


def test_cli_export_of_a_checkpoint_missing_a_file_is_an_error_naming_it(tmp_path):
    """torch's CheckpointException is a BaseException: a checkpoint missing a .distcp file (an interrupted copy)
    escaped as every rank's traceback, exit 1."""
    hf, ckpt, out = (str(tmp_path / d) for d in ("hf", "ckpt", "out"))
    make_model("llama31_untied", hf)
    assert _cli("import", "--hf", hf, "--out", ckpt).returncode == 0
    os.remove(os.path.join(ckpt, "iter_0000000", "__0_0.distcp"))
    res = _cli("export", "--ckpt", ckpt, "--out", out)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"convert export failed: {ckpt} cannot be read (FileNotFoundError: " in res.stderr
    assert "__0_0.distcp" in res.stderr and "a file of the checkpoint is missing or damaged" in res.stderr
    assert not os.path.exists(out) or not os.listdir(out)  # nothing half-written left there


def test_cli_export_to_fp16_refuses_a_weight_beyond_its_range(tmp_path):
    """A trained weight above fp16's 65504 would be exported as inf: exit 2 naming the tensor, nothing published;
    the same checkpoint exports in bf16."""
    hf, ckpt, out = (str(tmp_path / d) for d in ("hf", "ckpt", "out"))
    make_model("llama31_untied", hf)
    path = os.path.join(hf, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = 1.0e5
    save_file(tensors, path, metadata={"format": "pt"})
    assert _cli("import", "--hf", hf, "--out", ckpt).returncode == 0
    res = _cli("export", "--ckpt", ckpt, "--out", out, "--dtype", "fp16")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "model.layers.1.mlp.down_proj.weight: a value of magnitude 100000 does not fit float16" in res.stderr
    assert not os.path.exists(out) or not os.listdir(out)
    assert _cli("export", "--ckpt", ckpt, "--out", out, "--dtype", "bf16").returncode == 0
