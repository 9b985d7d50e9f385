"""Module docstrings as ``--help`` text: the docs' reStructuredText literals read as plain words in a terminal."""

from __future__ import annotations

__all__ = ["plain"]


def plain(doc: str) -> str:
    """``doc`` without RST's double backticks (``bft-megatron train`` -> bft-megatron train)."""
    return doc.replace("``", "")
