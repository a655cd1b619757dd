"""Distributed data-parallel training on torch.distributed (one process per device, torchrun).

    torchrun --standalone --nproc_per_node N -m training --config FILE ...   # or: ama-stream train --nproc N ...

What is per process (rank) and what is global, with W processes:

- train.batch_size is the GLOBAL batch: each step, the same seeded permutation of the normal images
  (one per epoch, identical on every rank) gives the step's global batch, and rank r trains on its
  positions r, r + W, r + 2W, ... -- DistributedSampler's sharding (`shard`), so the W shards are
  disjoint, each batch_size / W images, and together exactly the single-process run's batch. A batch
  size that W does not divide is refused.
- Gradients: E and G (one DistributedDataParallel over the autoencoder step) and the critic (one over
  the critic step) average their gradients over the ranks. Every loss is a mean over the rank's
  images, so the average is the global-batch gradient of the single-process loss.
- BatchNorm in E and G is SyncBatchNorm: the batch statistics of a training-mode pass are those of the
  global batch (with the auxiliary passes in eval mode, as without DDP). On CUDA the native
  nn.SyncBatchNorm; on the CPU (gloo), where torch's SyncBatchNorm refuses CPU tensors, CpuSyncBatchNorm,
  the same computation from differentiable all-reduces. Running statistics stay identical on all ranks.
- Buffers (BN running statistics, the critic's spectral-norm vectors) are broadcast from rank 0 at each
  DDP forward (broadcast_buffers): ranks cannot drift apart even by rounding.
- Random noise (gradient-penalty interpolates, simplex weights and permutations, atypical negatives) is
  drawn per rank from a generator seeded by (seed, rank); rank 0's stream is the single-process one.
  Interpolation mixes codes within the rank's shard, negatives are train.negatives.fraction of the
  rank's shard, `radius: empirical` is the shard's median code norm and gradient_penalty.samples is
  split over the ranks (ceil(samples / W) each).
- Rank 0 alone writes metrics.csv, TensorBoard, progress, the resume file (train_state.pt: the same
  format, plus every rank's noise-generator state), runs model selection and the final fit/evaluation,
  and writes model.pt; the others wait at a barrier. Logged losses are the mean over the ranks.

Backend: nccl when the processes train on CUDA devices (rank r on cuda:LOCAL_RANK), gloo on the CPU.
"""
from __future__ import annotations

import datetime
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ama_stream.scoring import resolve_device

log = logging.getLogger(__name__)

# Generous: rank 0 alone fits mu/sigma, evaluates and writes the report (or validates an epoch) while
# the others wait in a collective. torchrun tears the whole group down when any process fails, so a
# long timeout never leaves a hung job behind.
TIMEOUT = datetime.timedelta(hours=2)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a torch.distributed job (initialised by `init_from_env`)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (torch.distributed.run) started: its rendezvous env is set."""
    return all(key in os.environ for key in TORCHRUN_ENV)


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """train.batch_size is global; each of the world_size processes trains on an equal share."""
    if global_batch % world_size:
        raise ValueError(f"train.batch_size {global_batch} is not divisible by the {world_size} training processes "
                         f"(train.batch_size is the global batch, split evenly over the processes); use a multiple "
                         f"of {world_size}")
    return global_batch // world_size


def shard(batch_indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s share of one global batch (positions in the epoch permutation order): every
    world_size-th index from position `rank`, as DistributedSampler deals a permutation out."""
    return batch_indices[rank::world_size]


def rank_seed(seed: int, rank: int, *extra: int) -> int:
    """The noise-generator seed of `rank`: `seed` itself for rank 0 (the single-process stream),
    an independent stream (numpy SeedSequence of seed, rank, extra) for the others."""
    if rank == 0 and not extra:
        return seed
    return int(np.random.SeedSequence([seed, rank, *extra]).generate_state(1, np.uint64)[0] >> 1)


def rank_device(setting: str, local_rank: int) -> torch.device:
    """The device of the process with this LOCAL_RANK: cuda:LOCAL_RANK whenever it trains on CUDA
    (auto with CUDA present, cuda, or cuda:LOCAL_RANK itself), else the CPU."""
    setting = str(setting or "auto")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    wanted = resolve_device("cuda" if setting == "auto" else setting)  # validates, CUDA present
    if wanted.type != "cuda":
        return wanted
    if wanted.index is not None and wanted.index != local_rank:
        raise ValueError(f"device {setting!r}: in distributed training each process uses cuda:LOCAL_RANK (this one "
                         f"cuda:{local_rank}); set device to auto or cuda")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"process with LOCAL_RANK {local_rank} has no CUDA device of its own "
                         f"({torch.cuda.device_count()} here): start at most that many processes per node, "
                         "or train on the CPU with device=cpu")
    return torch.device("cuda", local_rank)


def init_from_env(device_setting: str) -> DistContext:
    """init_process_group from torchrun's environment: nccl on CUDA devices, gloo on the CPU."""
    if not launched_by_torchrun():
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        raise RuntimeError(f"not started by torchrun (missing {', '.join(missing)}); run "
                           "`torchrun --nproc_per_node N -m training ...` or `ama-stream train --nproc N ...`")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = rank_device(device_setting, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    ctx = DistContext(rank, world, local, device, backend)
    log.info("distributed training: %d processes, backend %s, rank 0 on %s", world, backend, device)
    return ctx


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """The mean of each logged value over the ranks (the same keys, in the same order, everywhere)."""
    keys = list(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / ctx.world_size).tolist()))


def all_gather_objects(obj, ctx: DistContext) -> list:
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


# ----- SyncBatchNorm ----------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the ranks: y = sum_r x_r, so dL/dx_r = sum_s dL/dy_s (an all-reduce of
    the gradients). torch.distributed.nn.functional.all_reduce, which newer torch deprecates."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """SyncBatchNorm for CPU tensors (gloo), which torch's own refuses (and DDP refuses nn.SyncBatchNorm
    in a CPU module, hence a BatchNorm2d subclass): in a training-mode pass the
    mean and (biased) variance are those of the global batch, from two differentiable all-reduces
    (sum and count, then the sum of squared deviations: the two-pass formula, as accurate as a single
    process's), so gradients flow across ranks exactly as through one BatchNorm over the global batch.
    Running statistics are updated as nn.BatchNorm does (unbiased variance over the global count).
    Eval mode, or no process group, is plain batch norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([float(x.numel() // x.shape[1])])
        totals = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply(centered.square().sum(dims)) / n
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                total = float(n)
                unbiased = var.detach() * (total / max(total - 1.0, 1.0))
                self.running_mean.mul_(1.0 - factor).add_(mean.detach() * factor)
                self.running_var.mul_(1.0 - factor).add_(unbiased * factor)
        return y


def _check_2d(module: nn.Module) -> None:
    others = [type(m).__name__ for m in module.modules() if isinstance(m, _BatchNorm) and not isinstance(
        m, (nn.BatchNorm2d, nn.SyncBatchNorm))]
    if others:
        raise ValueError(f"SyncBatchNorm conversion supports BatchNorm2d only, found {', '.join(others)}")


def _to_cpu_sync(module: nn.Module) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm with CpuSyncBatchNorm layers (parameters and buffers shared)."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, bias=module.bias is not None)
        _share_state(module, out)
    for name, child in module.named_children():
        out.add_module(name, _to_cpu_sync(child))
    return out


def _share_state(src: _BatchNorm, dst: _BatchNorm) -> None:
    if src.affine:
        dst.weight, dst.bias = src.weight, src.bias
    dst.running_mean, dst.running_var = src.running_mean, src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.training = src.training


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of `module` replaced in place by a synchronised one sharing its parameters and
    buffers (state_dict keys unchanged): torch's SyncBatchNorm on CUDA, CpuSyncBatchNorm on the CPU."""
    _check_2d(module)
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_cpu_sync(module)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of convert_sync_batchnorm: plain BatchNorm2d layers sharing the same state, for the
    passes rank 0 makes alone after training (weight-average statistics, scoring)."""
    out = module
    if isinstance(module, (nn.SyncBatchNorm, CpuSyncBatchNorm)):
        out = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, device=module.running_mean.device)
        _share_state(module, out)
    for name, child in module.named_children():
        out.add_module(name, revert_sync_batchnorm(child))
    return out


# ----- the two DDP-wrapped steps -----------------------------------------------------------------
class CriticStep(nn.Module):
    """The critic update's loss as one module whose registered parameters are exactly D's, so that
    DistributedDataParallel sees one forward per backward: the D pass over all pairs AND the gradient
    penalty's double-backward pass (autograd.grad w.r.t. the interpolates only, inside forward) use the
    raw critic; the single backward then accumulates every parameter's gradient once. E and G run
    without gradients here (held in a plain attribute, not registered)."""

    def __init__(self, model: nn.Module, objective, generator: torch.Generator):
        super().__init__()
        self.discriminator = model.discriminator
        self._refs = (model, objective, generator)

    def forward(self, x: torch.Tensor, z_neg: torch.Tensor | None):
        model, objective, generator = self._refs
        return objective.critic_loss(model, x, z_neg, generator)


class AutoencoderStep(nn.Module):
    """The E/G update's loss as one module whose registered parameters are E's and G's: the several E
    and G passes of a step (reconstruction, negatives, interpolants) are one DDP forward. The critic,
    frozen during this step, is a plain attribute."""

    def __init__(self, model: nn.Module, objective, generator: torch.Generator):
        super().__init__()
        self.encoder = model.encoder
        self.generator = model.generator
        self._refs = (model, objective, generator)

    def forward(self, x: torch.Tensor, z_neg: torch.Tensor | None):
        model, objective, generator = self._refs
        return objective.autoencoder_loss(model, x, z_neg, generator)


def wrap(step: nn.Module, ctx: DistContext) -> nn.parallel.DistributedDataParallel:
    """DDP over one step module. Every registered parameter gets a gradient in every backward, so no
    unused-parameter search; buffers are broadcast from rank 0 at each forward."""
    return nn.parallel.DistributedDataParallel(
        step, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        forward_sync_buffers=True, find_unused_parameters=False)


def split_samples(samples: int | None, world_size: int) -> int | None:
    """gradient_penalty.samples is per step (global); each rank takes its share, rounded up."""
    return None if samples is None else max(1, math.ceil(samples / world_size))
