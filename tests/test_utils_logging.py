"""The rank-aware logger's handling of third-party noise (``bft_megatron.utils.logging``)."""

from __future__ import annotations

import logging


def test_known_third_party_noise_is_hidden_and_nothing_else():
    import warnings

    from bft_megatron.utils.logging import quiet_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.", UserWarning)
        warnings.warn("full scope is deprecated. Use empty cuda_graph_scope", UserWarning)
        warnings.warn("barrier(): using the device under current context. You can specify `device_id`", UserWarning)
        warnings.warn("`load_state_dict` is deprecated and will be removed in future versions. Please use `load` "
                      "instead.", FutureWarning)
        warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning)
        warnings.warn("Apex is not installed", DeprecationWarning)  # another category: kept
        warnings.warn("something a user should see", UserWarning)
    assert [str(w.message) for w in caught] == ["Apex is not installed", "something a user should see"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_megatron_019s_layout_notice_is_dropped_and_its_other_records_kept():
    """megatron-core 0.19's DDP warns on every run that its caller did not pass ``full_param_layout`` (it computes
    the same layout itself): hidden, once however often the entry point runs; the logger's other records stay."""
    from bft_megatron.utils.logging import quiet_known_warnings

    logger = logging.getLogger("megatron.core.distributed.distributed_data_parallel")
    records, filters = _Records(), list(logger.filters)
    logger.addHandler(records)
    try:
        quiet_known_warnings()
        quiet_known_warnings()
        assert sum(type(f).__name__ == "_DropMessage" for f in logger.filters) == 1  # not one per call
        logger.warning("DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True."
                       " Auto-computing layout inside DDP. Callers should pre-compute layouts via ...")
        logger.warning("Setting up DistributedDataParallel with config %s", "X")
    finally:
        logger.removeHandler(records)
        logger.filters[:] = filters
    assert records.messages == ["Setting up DistributedDataParallel with config X"]


def test_a_record_logged_under_a_progress_bar_gets_its_own_line():
    """``prepare`` logs "reading ..." while its tokenize bar is drawn: the record used to continue the bar's line."""
    import io

    from tqdm import tqdm

    from bft_megatron.utils.logging import _BarAwareHandler

    stream = io.StringIO()
    handler = _BarAwareHandler(stream)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    with tqdm(desc="tokenize train", unit=" rec", file=stream, mininterval=0) as bar:
        bar.update(3)
        handler.emit(logging.LogRecord("bft_megatron", logging.INFO, __file__, 1, "reading a.jsonl", None, None))
        bar.update(1)
    text = stream.getvalue()
    assert "[INFO] reading a.jsonl\n" in text
    before = text[:text.index("[INFO] reading")]
    assert before.endswith("\r") or before.endswith("\n"), repr(text)  # the bar's line was cleared first
