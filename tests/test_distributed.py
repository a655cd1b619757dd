"""Distributed training (torch.distributed, gloo on this CPU): 2 real processes started by torchrun train
a tiny model on real images; the loss curve matches a single process with the same global batch and seed;
rank 0 alone writes; the resume file works both ways; what cannot work is refused."""
import csv
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from ama_stream.checkpoint import load_checkpoint
from ama_stream.settings import load_settings, parse_overrides
from training import distributed as ddp
from training.config import TrainConfig
from training.datasets import EvalSet, ProtocolData
from training.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]
CPU_PRESET = REPO / "configs" / "fmnist_vs_mnist_cpu.yaml"
FIXTURE_DATA = REPO / "tests" / "data"  # 1200 Fashion-MNIST training images, 600 test images of each set
# Tiny model, 2 epochs of 3 steps of a global batch of 16 (8 per process), every step logged. The objective
# is the preset's without simplex interpolation and the gradient penalty (negatives start at epoch 6):
# nothing random but the data order, which both runs share, so the curves can be compared tightly.
# Spectral norm stays on (the preset dropped it): its power-iteration vectors are buffers DDP must
# broadcast, and a bounded critic keeps float rounding from growing over the steps (without it the
# two curves drifted 2.9e-3 apart by step 6 in one run of the suite, over the tolerance below).
TINY = ["model.nz=8", "model.enc_width=4", "model.gen_width=8", "model.disc_width=8", "train.batch_size=16",
        "train.epochs=2", "train.steps_per_epoch=3", "train.log_every=1", "train.fit_max_images=64",
        "data.limit_train=128", "data.limit_test=48", "device=cpu", "loss.interpolation.enabled=false",
        "loss.gradient_penalty.enabled=false", "model.spectral_norm=true"]
# Everything that draws noise per rank or needs care under DDP: the gradient penalty's double backward
# (on a subset, split over the ranks, lazily on every other critic step), interpolation, atypical
# negatives with their auxiliary passes, several critic steps per E/G step.
FULL_OBJECTIVE = ["loss.gradient_penalty.enabled=true", "loss.gradient_penalty.samples=6",
                  "loss.gradient_penalty.every=2",
                  "loss.interpolation.enabled=true", "loss.negatives.enabled=true", "loss.negatives.start_epoch=0",
                  "optim.d_steps=2"]
# Measured on this machine: the 2-process curve stays within 1.3e-4 (relative) of the single process's over
# 6 steps (float rounding: per-rank sums all-reduced in SyncBatchNorm and DDP vs one batch; 1 vs 2 threads).
# Training without averaging the gradients (each rank steps on its own half batch) is 1.8e-2 to 5e-2 off
# by step 2-6, ten times this tolerance.
RTOL, ATOL = 2e-3, 1e-3


def child_env() -> dict:
    """The subprocesses import this checkout's packages, whatever the virtual environment has installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("AMA_DEBUG", None)
    return env


def tiny_config(*extra: str) -> TrainConfig:
    return load_settings(TrainConfig, CPU_PRESET, parse_overrides([*TINY, f"data_root={FIXTURE_DATA}", *extra]))


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def sets(*items: str) -> list[str]:
    return [f"--set={s}" for s in items]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """`ama-stream train --nproc 2`: torchrun, 2 gloo processes of `python -m training`."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ama_stream.cli", "train", "--nproc", "2", "--config", str(CPU_PRESET),
                           "--data-root", str(FIXTURE_DATA), "--out", str(out), *sets(*TINY)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"2-process run: {time.monotonic() - t0:.1f}s")
    return out, proc


@pytest.mark.slow
def test_two_process_gloo_run_writes_one_checkpoint_and_matches_one_process(two_process_run, tmp_path, monkeypatch):
    out, proc = two_process_run
    assert proc.stdout.count("wrote ") == 1 and str(out / "model.pt") in proc.stdout  # rank 0 reports, alone
    assert sorted(p.name for p in out.rglob("*.pt")) == ["model.pt", "train_state.pt"]
    ckpt = load_checkpoint(out / "model.pt")
    ckpt.build_model()  # plain BatchNorm keys: the normal loader and Scorer take it
    assert ckpt.metrics["steps"] == 6 and ckpt.metrics["epochs"] == 2
    # each process trained on its own half of every global batch: 6 steps x 8 images
    assert ckpt.metrics["distributed"] == {"processes": 2, "backend": "gloo", "images_per_process": [48, 48]}

    monkeypatch.setattr(Trainer, "_write_report", lambda *a, **k: None)  # the plots are not compared
    train(tiny_config(), out_dir=tmp_path / "single")
    two, one = read_csv(out / "metrics.csv"), read_csv(tmp_path / "single" / "metrics.csv")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [str(s) for s in range(1, 7)]
    keys = [k for k in one[0] if k not in ("step", "epoch", "elapsed_s")]
    assert set(keys) == {"wasserstein", "loss_d", "d_recon", "latent_norm", "loss_g"} and list(two[0]) == list(one[0])
    curve = lambda rows: np.array([[float(r[k]) for k in keys] for r in rows])  # noqa: E731
    np.testing.assert_allclose(curve(two), curve(one), rtol=RTOL, atol=ATOL)
    assert not np.allclose(curve(one)[0], curve(one)[-1], rtol=0.05)  # the models did move


@pytest.mark.slow
def test_one_process_resumes_a_two_process_run(two_process_run):
    out, _ = two_process_run
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["dist"]["world_size"] == 2 and len(state["dist"]["gen"]) == 2
    assert torch.equal(state["dist"]["gen"][0], state["rng"]["gen"])  # rank 0's stream is the main one
    assert not torch.equal(state["dist"]["gen"][0], state["dist"]["gen"][1])  # ranks draw different noise
    resumed = train(tiny_config("train.epochs=3"), resume=out / "train_state.pt")
    assert resumed.metrics["steps"] == 9 and "distributed" not in resumed.metrics


@pytest.mark.slow
def test_two_process_run_resumes_with_the_full_objective(two_process_run, tmp_path):
    """Straight torchrun (`-m training`), resuming the first run's file with the gradient penalty,
    interpolation and negatives switched on."""
    out, _ = two_process_run
    resumed = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training",
           "--config", str(CPU_PRESET), "--data-root", str(FIXTURE_DATA), "--out", str(resumed),
           "--resume", str(out / "train_state.pt"), *sets(*TINY, *FULL_OBJECTIVE, "train.epochs=3")]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "at epoch 2, step 6" in proc.stderr
    ckpt = load_checkpoint(resumed / "model.pt")
    assert ckpt.metrics["steps"] == 9 and ckpt.metrics["distributed"]["images_per_process"] == [24, 24]
    rows = read_csv(resumed / "metrics.csv")
    assert [r["step"] for r in rows] == ["7", "8", "9"]
    assert all(np.isfinite(float(r["gp"])) and float(r["gp"]) > 0 for r in rows)
    state = torch.load(resumed / "train_state.pt", weights_only=True)
    assert state["loop"]["step"] == 9 and state["dist"]["world_size"] == 2


@pytest.fixture
def cli_main():
    """ama_stream.cli.main in-process; the root logging handlers it installs are put back afterwards."""
    from ama_stream.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield main
    root.handlers[:] = handlers
    root.setLevel(level)


def test_an_indivisible_batch_is_refused(tmp_path, cli_main, capsys, monkeypatch):
    # `ama-stream train --nproc 2`: before torchrun starts, one line, exit 1, nothing written
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("torchrun started"))
    code = cli_main(["train", "--nproc", "2", "--config", str(CPU_PRESET), "--data-root", str(FIXTURE_DATA),
                     "--out", str(tmp_path / "out"), *sets(*TINY, "train.batch_size=15")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "train.batch_size 15 is not divisible by the 2 training processes" in err
    assert not (tmp_path / "out").exists()
    # and in each process started by torchrun directly, before any collective
    rank0 = ddp.DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
    data = np.zeros((32, 32, 32, 1), np.uint8)
    empty = EvalSet(data[:0], np.zeros(0, np.int64), ())
    with pytest.raises(ValueError, match="not divisible by the 2 training processes"):
        Trainer(tiny_config("train.batch_size=15"), ProtocolData(data, (), empty, empty), dist=rank0)


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_gets_its_distributed_sampler_share_of_the_global_batch(world):
    order = np.random.default_rng(0).permutation(100)  # the epoch's permutation, the same on every rank
    batch = 16
    shares = [DistributedSampler(range(len(order)), num_replicas=world, rank=r, shuffle=False, drop_last=True)
              for r in range(world)]
    for step in range(len(order) // batch):
        global_batch = order[step * batch:(step + 1) * batch]
        parts = [ddp.shard(global_batch, r, world) for r in range(world)]
        per_rank = ddp.per_rank_batch(batch, world)
        for r, part in enumerate(parts):  # what DistributedSampler + a per-rank batch of 16/world deal out
            positions = list(shares[r])[step * per_rank:(step + 1) * per_rank]
            assert part.tolist() == order[positions].tolist()
        assert sorted(np.concatenate(parts).tolist()) == sorted(global_batch.tolist())  # disjoint, complete
    assert ddp.rank_seed(7, 0) == 7  # rank 0 draws the single-process noise
    assert len({ddp.rank_seed(7, r) for r in range(4)}) == 4


def test_cpu_sync_batchnorm_is_batchnorm_and_converts_both_ways():
    """With a one-process gloo group the synchronised layer must be nn.BatchNorm2d exactly (outputs,
    gradients, running statistics); conversion keeps parameters, buffers and state_dict keys shared."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    twin = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    twin.load_state_dict(plain.state_dict())
    keys, weight = list(twin.state_dict()), twin[1].weight
    assert ddp.convert_sync_batchnorm(twin, torch.device("cpu")) is twin
    assert isinstance(twin[1], ddp.CpuSyncBatchNorm) and twin[1].weight is weight and list(twin.state_dict()) == keys
    x = torch.randn(6, 3, 9, 9).to(memory_format=torch.channels_last)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for _ in range(2):
            y_plain, y_twin = plain(x), twin(x)
            torch.testing.assert_close(y_twin, y_plain, rtol=1e-5, atol=1e-5)
            (y_plain.square().mean() + y_plain[:, 0].sum()).backward()
            (y_twin.square().mean() + y_twin[:, 0].sum()).backward()
        for p, q in zip(plain.parameters(), twin.parameters()):  # (the conv bias's is 0 up to rounding)
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(twin[1], name), getattr(plain[1], name), rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
    ddp.revert_sync_batchnorm(twin)
    assert type(twin[1]) is nn.BatchNorm2d and twin[1].weight is weight and list(twin.state_dict()) == keys


def test_each_process_trains_on_its_own_device():
    assert ddp.rank_device("cpu", 3) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert ddp.rank_device("auto", 1) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            ddp.rank_device("cuda", 0)
    else:
        with pytest.raises(ValueError, match="each process uses cuda:LOCAL_RANK"):
            ddp.rank_device(f"cuda:{torch.cuda.device_count() - 1}", torch.cuda.device_count())


def test_each_rank_resumes_its_own_noise_stream():
    """Rank r > 0 restores its own generator from a file of a run with as many processes, and starts a
    fresh (seed, rank, step) stream from any other file; rank 0 always continues the main stream."""
    data = np.zeros((32, 32, 32, 1), np.uint8)
    empty = EvalSet(data[:0], np.zeros(0, np.int64), ())
    states = [torch.Generator().manual_seed(s).get_state() for s in (11, 12, 13)]
    single = {"rng": {"gen": states[0]}}
    two = {"rng": {"gen": states[0]}, "dist": {"world_size": 2, "gen": states[:2]}}
    three = {"rng": {"gen": states[0]}, "dist": {"world_size": 3, "gen": states}}

    def trainer(rank: int) -> Trainer:
        ctx = ddp.DistContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), backend="gloo")
        t = Trainer(tiny_config(), ProtocolData(data, (), empty, empty), dist=ctx)
        t.state.step = 6
        return t

    for payload in (single, two, three):
        t = trainer(0)
        t._load_gen_state(payload)
        assert torch.equal(t.gen.get_state(), states[0])
    t = trainer(1)
    t._load_gen_state(two)
    assert torch.equal(t.gen.get_state(), states[1])
    fresh = torch.Generator().manual_seed(ddp.rank_seed(tiny_config().seed + 1, 1, 6)).get_state()
    for payload in (single, three):
        t = trainer(1)
        t._load_gen_state(payload)
        assert torch.equal(t.gen.get_state(), fresh)
