"""Every rank of a job agrees before megatron's groups exist (parallel/consistency.py, called by
``bootstrap.initialize``): the same resolved config, and one ``checkpoint.save`` directory shared by every rank.
Spawned gloo ranks each load their own command line, as each node's launcher does."""

import os

from tests.dist_harness import run_distributed

BASE = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.vocab_size=128"]


def _agree(rank: int, world: int, per_rank: list[list[str]], saves: list[str]) -> str | None:
    from bft_megatron.config import ConfigError, load_config
    from bft_megatron.parallel.consistency import check_job

    cfg = load_config(None, BASE + per_rank[rank] + [f"checkpoint.save={saves[rank]}"])
    try:
        check_job(cfg)
    except ConfigError as exc:
        return str(exc)
    return None


def _scenarios(rank: int, world: int, tmp: str) -> dict:
    same = os.path.join(tmp, "run")
    out = {
        "agree": _agree(rank, world, [[], []], [same, same]),
        "lr": _agree(rank, world, [[], ["train.lr=0.1"]], [same, same]),
        "layout": _agree(rank, world, [[], ["parallel.tp=2", "train.global_batch_size=16"]], [same, same]),
    }
    out["probe_left"] = sorted(os.listdir(same))
    if rank == 0:
        open(os.path.join(tmp, "blocked"), "w").close()  # a file where rank 0 would make the directory
    blocked = os.path.join(tmp, "blocked", "ckpt")
    out["unwritable"] = _agree(rank, world, [[], []], [blocked, blocked])  # every rank answers, none waits
    from bft_megatron.parallel import consistency

    consistency.SHARED_WAIT_S = 0.5  # what a rank that does not see the file waits for
    home = os.getcwd()
    os.makedirs(os.path.join(tmp, f"node{rank}"))
    os.chdir(os.path.join(tmp, f"node{rank}"))  # the same relative path, another directory on each node
    try:
        out["save"] = _agree(rank, world, [[], []], ["ckpt", "ckpt"])
    finally:
        os.chdir(home)
    out.update(_initialize(rank, same))
    return out


def _initialize(rank: int, save: str) -> dict:
    """Through ``bootstrap.initialize``: a TP disagreement is found before megatron's group creation (where it
    waited for the timeout), and every megatron group gets ``timeout_minutes`` (its default was 30 minutes)."""
    import torch

    from bft_megatron.config import ConfigError, load_config
    from bft_megatron.parallel import bootstrap
    from bft_megatron.parallel.consistency import check_job

    tp = [1, 2][rank]
    cfg = load_config(None, BASE + [f"parallel.tp={tp}", f"checkpoint.save={save}"])
    try:
        bootstrap.initialize(tp, agree=lambda: check_job(cfg))
        refused = None
    except ConfigError as exc:
        refused = str(exc)
    groups = bootstrap.initialize(1, seed=1, timeout_minutes=7)
    timeouts = [str(g._get_backend(torch.device("cpu")).options._timeout) for g in (groups.dp, groups.tp, groups.pp)]
    bootstrap.destroy(keep_process_group=True)
    return {"tp_refused": refused, "timeouts": timeouts}


def test_ranks_agree_on_the_config_and_the_save_directory(tmp_path):
    results = run_distributed(_scenarios, 2, str(tmp_path))
    for got in results:  # every rank reports the same, so every rank exits 2
        assert got["agree"] is None
        assert got["lr"] == ("the ranks were started with different configs: rank 1 (" + os.uname().nodename
                             + "): train.lr=0.1 (rank 0: 1e-05). Start every node with the same --config and overrides")
        assert "rank 1 (" in got["layout"] and "parallel.tp=2 (rank 0: 1)" in got["layout"]
        assert "train.global_batch_size=16 (rank 0: " in got["layout"]
        assert got["save"] == (
            f"checkpoint.save=ckpt is not one directory shared by every rank: rank 1 ({os.uname().nodename}, "
            f"{tmp_path}/node1/ckpt) do not see the file rank 0 ({os.uname().nodename}, {tmp_path}/node0/ckpt) wrote "
            "there. Every rank writes its shards into it: use an absolute path on a file system every node mounts")
        assert got["probe_left"] == []  # the probe file is removed
        assert got["unwritable"].startswith(f"checkpoint.save={tmp_path}/blocked/ckpt: global rank 0 cannot write "
                                            "there (NotADirectoryError: ")
        assert "parallel.tp=2 (rank 0: 1)" in got["tp_refused"]
        assert got["timeouts"] == ["0:07:00"] * 3
    assert results[0] == results[1]
