"""Async saves ask megatron-core for its own writer: from 0.17 on ``dist_checkpointing.save`` takes
``async_strategy`` and defaults it to ``"nvrx"`` (nvidia-resiliency-ext, another request queue than the
``AsyncCallsQueue`` that schedules this project's saves). CI has 0.16.1, which has no such parameter, so the
newer signature is faked here; the real 0.17.1-0.19.2 runs are in docs/training.md, "megatron-core versions"."""

import inspect

from megatron.core import dist_checkpointing

from bft_megatron.checkpoint import manager


def test_async_saves_ask_for_the_mcore_writer_where_save_takes_a_strategy(monkeypatch):
    def save_017(sharded_state_dict, checkpoint_dir, sharded_strategy=None, common_strategy=None,
                 validate_access_integrity=True, async_sharded_save=False,
                 preprocess_common_before_consistancy_check=None, content_metadata=None, async_strategy="nvrx"):
        raise AssertionError("not called")

    monkeypatch.setattr(dist_checkpointing, "save", save_017)
    assert manager._mcore_async_kwargs() == {"async_strategy": "mcore"}


def test_nothing_is_added_where_save_has_no_strategy(monkeypatch):
    def save_016(sharded_state_dict, checkpoint_dir, sharded_strategy=None, common_strategy=None,
                 validate_access_integrity=True, async_sharded_save=False):
        raise AssertionError("not called")

    monkeypatch.setattr(dist_checkpointing, "save", save_016)
    assert manager._mcore_async_kwargs() == {}


def test_the_installed_megatron_gets_what_its_save_accepts():
    kwargs = manager._mcore_async_kwargs()
    assert set(kwargs) <= set(inspect.signature(dist_checkpointing.save).parameters)
