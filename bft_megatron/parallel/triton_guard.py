"""``import megatron.core`` without triton (CPU torch wheels have none): a stub for its one unconditional import.

megatron-core 0.18 added MoE "paged stash" Triton kernels, and ``pipeline_parallel/schedules.py`` (hence
``import megatron.core``) imports them whatever the model: 0.18 from ``transformer/moe/paged_stash.py``, 0.19 from
``transformer/moe/ops/paged_stash.py``, each starting with a bare ``import triton``. Every other triton import of
megatron-core is guarded (``try: import triton``), and the paged stash runs only with ``moe_paged_stash=True``
(MoE, GPU), which this trainer never sets. So where triton cannot be found, :func:`install` puts a meta-path
finder in front that serves those modules as stubs: any name taken from them is a placeholder that raises an
``ImportError`` naming triton when used. A fake ``triton`` module is deliberately *not* provided: the guarded
imports would then take triton for present. megatron-core 0.16/0.17 have no such module: nothing happens.

Installed by ``bft_megatron/__init__.py`` (before any megatron import of ours); torch-free, so the CLI stays light.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys

__all__ = ["install", "is_stub", "STUBBED_MODULES"]

# The megatron-core modules reached from ``import megatron.core`` that may import triton unconditionally.
STUBBED_MODULES = ("megatron.core.transformer.moe.paged_stash", "megatron.core.transformer.moe.ops.paged_stash")
_TOP_LEVEL_TRITON_IMPORT = re.compile(r"^(import triton\b|from triton\b)", re.M)


class _NeedsTriton:
    """Stands in for a name of a stubbed module: calling or launching it (``kernel[grid](...)``) raises."""

    def __init__(self, qualname: str):
        self._qualname = qualname

    def __call__(self, *args, **kwargs):
        raise ImportError(f"{self._qualname} needs triton, which is not installed (megatron-core's MoE paged "
                          "stash; bft_megatron stubbed it out, see bft_megatron/parallel/triton_guard.py)")

    def __getitem__(self, _grid):
        return self

    def __repr__(self) -> str:
        return f"<{self._qualname}: needs triton>"


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        name = module.__name__

        def __getattr__(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _NeedsTriton(f"{name}.{attr}")

        module.__getattr__ = __getattr__
        module.__bft_triton_stub__ = True


def _imports_triton(path: str | None) -> bool:
    if not path or not path.endswith(".py"):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return bool(_TOP_LEVEL_TRITON_IMPORT.search(f.read()))
    except OSError:
        return False


class _TritonlessFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in STUBBED_MODULES:
            return None
        real = importlib.machinery.PathFinder.find_spec(fullname, path)
        if real is None or not _imports_triton(real.origin):
            return None  # absent in this megatron-core, or its triton import is guarded: import it as is
        return importlib.util.spec_from_loader(fullname, _StubLoader(), origin=real.origin)


def _triton_missing() -> bool:
    try:
        return importlib.util.find_spec("triton") is None
    except (ImportError, ValueError):
        return True


def install() -> bool:
    """Put the finder first on ``sys.meta_path`` if triton is not installed; returns whether it is there.

    Idempotent. Does nothing (False) where triton is importable: megatron's real modules are used."""
    if any(isinstance(f, _TritonlessFinder) for f in sys.meta_path):
        return True
    if not _triton_missing():
        return False
    sys.meta_path.insert(0, _TritonlessFinder())
    return True


def is_stub(module) -> bool:
    """Whether ``module`` is one of this guard's stubs."""
    return bool(getattr(module, "__dict__", {}).get("__bft_triton_stub__"))
