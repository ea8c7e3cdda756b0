"""Data-parallel training: two gloo processes on the CPU, as torchrun would start them."""

import os
import socket

import torch
import torch.multiprocessing as mp

import sd_train
from conftest import run_args
from lib import distributed
from lib.checkpoint import load_model


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world_size, port, argv, out):
    """One process of a 2-process run: the environment torchrun sets, then the script's own path."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    args, resumed = sd_train.resolve_args(argv)
    ctx = distributed.init(args.device)
    stop = sd_train.StopRequest()
    try:
        run = sd_train.train(args, resumed, stop, ctx)
        torch.save({"model": run.model.state_dict(), "ema": run.ema.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        stop.restore()
        distributed.close()


def spawn(argv, out, world_size=2):
    mp.spawn(worker, args=(world_size, free_port(), argv, str(out)), nprocs=world_size, join=True)


def test_shards_are_disjoint_and_cover_each_global_batch():
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    ranks = [distributed.shard(order, 8, distributed.Context(r, 2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 50 = 3 full global batches of 16 + one of 2
    seen = torch.cat([torch.cat(r) for r in ranks])
    assert len(seen) == len(set(seen.tolist())) == 50  # disjoint, and together all of the epoch
    for a, b, gb in zip(*ranks, order.split(16), strict=True):
        assert torch.equal(torch.cat([a, b]), gb)
    single = distributed.shard(order, 8, distributed.Context())
    assert [len(b) for b in single] == [8] * 6 + [2]  # alone: plain batches, the last one partial


def test_two_process_run_then_resume(data_root, tmp_path):
    out = tmp_path / "run"
    spawn(run_args(data_root, out, "--epochs", "2", batch_size=8), tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for part in ("model", "ema"):
        for k, v in r0[part].items():
            if not k.endswith(
                ("running_mean", "running_var", "num_batches_tracked")
            ):  # buffers: rank 0's are saved
                assert torch.equal(v, r1[part][k]), (part, k)
    # rank 0 alone wrote the outputs: one log with one row per epoch, one set of files (and the
    # folder's lock file, rank 0's)
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "best.pt",
        "epoch_1.png",
        "epoch_2.png",
        "last.pt",
        "loss_curve.png",
        "training_log.csv",
    ]
    assert len((out / "training_log.csv").read_text().splitlines()) == 3
    ckpt = torch.load(out / "last.pt", weights_only=True)["train"]
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 2 * 4  # 64 images / (2 x 8) = 4 steps an epoch
    for k, v in r0["ema"].items():  # the checkpoint loads in a single process and holds rank 0's EMA
        assert torch.equal(load_model(out / "last.pt")[0].state_dict()[k], v)
    # resumed by 2 processes: continues at epoch 3
    spawn(["--resume", str(out / "last.pt"), "--epochs", "3"], tmp_path)
    assert torch.load(out / "last.pt", weights_only=True)["train"]["epoch"] == 3
    # and by a single process (another process count): continues at epoch 4
    assert sd_train.main(["--resume", str(out / "last.pt"), "--epochs", "4"]) == 0
    state = torch.load(out / "last.pt", weights_only=True)["train"]
    assert (
        state["epoch"] == 4
        and state["world_size"] == 1
        and [r["epoch"] for r in state["log"]] == [1, 2, 3, 4]
    )
