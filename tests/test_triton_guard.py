"""``import megatron.core`` where triton is missing (CPU torch wheels): megatron-core >= 0.18 imports its MoE
paged-stash Triton kernels unconditionally; bft_megatron's triton_guard stubs that module. Checked in fresh
interpreters in which ``import triton`` fails (as without the package), whatever the installed megatron-core: on
0.16/0.17 nothing is stubbed and everything imports anyway."""

import ast
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import sys, warnings
    warnings.filterwarnings("ignore")
    sys.modules["triton"] = None  # `import triton` raises ImportError, as without the package
    import bft_megatron
    from bft_megatron.parallel import triton_guard

    assert triton_guard.install() and triton_guard.install()  # installed by the package import; idempotent
    import megatron.core
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    stubbed = [name for name in triton_guard.STUBBED_MODULES
               if name in sys.modules and triton_guard.is_stub(sys.modules[name])]
    for name in stubbed:
        kernel = getattr(sys.modules[name], "paged_stash_copy_kernel")
        try:
            kernel[(1,)](0)
        except ImportError as e:
            assert "needs triton" in str(e)
        else:
            raise AssertionError("a stubbed kernel ran")
    assert sys.modules["triton"] is None  # no fake triton: megatron's guarded imports still see it missing
    print("STUBBED", stubbed)
''')


def _run(code: str):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)


def test_megatron_core_imports_without_triton():
    import megatron.core

    proc = _run(SCRIPT)
    assert proc.returncode == 0 and "STUBBED" in proc.stdout, proc.stderr[-4000:]
    stubbed = ast.literal_eval(proc.stdout.split("STUBBED", 1)[1].strip())
    major_minor = tuple(int(x) for x in megatron.core.__version__.split(".")[:2])
    if major_minor >= (0, 18):  # the version that made the import unconditional
        assert len(stubbed) == 1, stubbed
    else:
        assert stubbed == [], stubbed


def test_nothing_is_stubbed_where_triton_is_importable(tmp_path):
    """With a (fake, empty) triton package on the path the guard stays out: megatron's real modules are used."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from bft_megatron.parallel import triton_guard; "
            "assert not triton_guard.install(); "
            "assert not any(type(f).__name__ == '_TritonlessFinder' for f in sys.meta_path); print('OK')")
    proc = _run(code)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
