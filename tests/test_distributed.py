"""Data-parallel training: two gloo processes on the CPU, as torchrun would start them."""

import os
import socket

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import sd_train
from conftest import TINY, run_args
from lib import distributed, trainer
from lib.checkpoint import load_model
from lib.cli import StopRequest, UserError
from lib.diffusion import diffusion_schedule
from lib.training import Training


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank, world_size, port):
    """The environment torchrun gives each of its processes, on this machine."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def worker(rank, world_size, port, argv, out):
    """One process of a 2-process run: the environment torchrun sets, then the script's own path."""
    torchrun_env(rank, world_size, port)
    args, resumed = sd_train.resolve_args(argv)
    ctx = distributed.init(args.device)
    stop = StopRequest()
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


def fixed_batch():
    """8 images with their noise levels and noise, the same in every process."""
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(8, 3, 32, 32, generator=g),
        torch.rand(8, 1, 1, 1, generator=g),
        torch.randn(8, 3, 32, 32, generator=g),
    )


def gradients(step_model, model, x0, t, eps):
    """Parameter gradients of the L1 noise loss on (x0, t, eps), with BatchNorm in eval mode (its
    running statistics), so that each image's loss depends on that image alone."""
    step_model.eval()
    noise_rate, signal_rate = diffusion_schedule(t)
    eps_hat = step_model(signal_rate * x0 + noise_rate * eps, noise_rate.flatten() ** 2)
    F.l1_loss(eps_hat, eps).backward()
    return [p.grad.clone() for p in model.parameters()]


def ddp_worker(rank, world_size, port, out):
    torchrun_env(rank, world_size, port)
    ctx = distributed.init("cpu")
    try:
        torch.manual_seed(0)  # the same initial weights as the single process
        run = Training(TINY, torch.device("cpu"), "fp32", 1e-3, distributed=ctx.active)
        part = slice(rank * 4, rank * 4 + 4)
        torch.save(
            gradients(run.step_model, run.model, *(t[part] for t in fixed_batch())), f"{out}/grads{rank}.pt"
        )
    finally:
        distributed.close()


def test_two_processes_on_two_halves_get_the_gradients_of_one_on_the_whole_batch(tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    run = Training(TINY, torch.device("cpu"), "fp32", 1e-3)
    whole = gradients(run.model, run.model, *fixed_batch())
    for rank in range(2):
        shards = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        for i, (a, b) in enumerate(zip(shards, whole, strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"rank {rank}, parameter {i}")


def nan_worker(rank, world_size, port, argv, out):
    """Rank 1 alone sees a NaN in the epoch's last batch; DDP spreads its gradient to rank 0."""
    torchrun_env(rank, world_size, port)
    real, calls = trainer.to_model_space, []

    def poisoned(*args, **kwargs):
        calls.append(None)
        x0 = real(*args, **kwargs)
        return x0.index_fill(0, torch.tensor([0]), float("nan")) if rank == 1 and len(calls) == 4 else x0

    trainer.to_model_space = poisoned
    args, resumed = sd_train.resolve_args(argv)
    ctx = distributed.init(args.device)
    try:
        sd_train.train(args, resumed, StopRequest(), ctx)
    except UserError as e:
        (out / f"error{rank}.txt").write_text(str(e))
    finally:
        distributed.close()


def test_a_nan_on_one_rank_stops_every_rank_before_saving(data_root, tmp_path):
    run = tmp_path / "run"
    argv = run_args(data_root, run, "--epochs", "1", "--precision", "bf16", batch_size=8)  # 4 steps
    mp.spawn(nan_worker, args=(2, free_port(), argv, tmp_path), nprocs=2, join=True)
    for rank in range(2):
        assert "diverged in epoch 1: 1 of its 4 steps" in (tmp_path / f"error{rank}.txt").read_text()
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()
