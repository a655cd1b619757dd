"""`ama-stream train`: train on a config, write OUT/model.pt, metrics.json, metrics.csv and the report.

`--normal folder:DIR` (and optionally `--anomaly folder:DIR`) trains on your own images; without
`--config` the template configs/own_data.yaml is used. With good images only, a seeded slice of
them (data.test_fraction) is held out and the report says what can be known without labels.

`--nproc N` trains data-parallel in N processes (torchrun, `python -m training` in each; nccl on
GPUs, gloo on the CPU): train.batch_size stays the global batch. Run under torchrun directly
(`torchrun --nproc_per_node N -m training ...`), this command is one of those processes.
training/distributed.py says what is per process and what is global.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from ama_stream.logs import JsonFormatter
from ama_stream.settings import SettingsError, deep_merge, load_settings, parse_overrides
from ama_stream.sources import parse_source

from .. import distributed as ddp
from ..config import TrainConfig
from ..trainer import TrainingStopped, train


OWN_DATA_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "own_data.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="training YAML (configs/*.yaml; default with --normal: configs/own_data.yaml)")
    p.add_argument("--normal", metavar="SOURCE", help="the good images, e.g. folder:/data/line3/good (sets data.normal)")
    p.add_argument("--anomaly", metavar="SOURCE", help="defect images for the report, e.g. folder:/data/line3/bad "
                                                      "(sets data.anomaly; optional)")
    p.add_argument("--normal-classes", help="class selection for --normal, comma separated")
    p.add_argument("--anomaly-classes", help="class selection for --anomaly, comma separated")
    p.add_argument("--skip-corrupt", action="store_true", help="skip and count undecodable images instead of stopping")
    p.add_argument("--data-root", help="folder that relative data roots resolve against (default: AMA_DATA_ROOT)")
    p.add_argument("--out", help="output folder (default: runs/<config name>-<time>)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--max-steps", type=int, help="stop after N encoder/generator steps")
    p.add_argument("--device", help="auto, cpu or cuda:N")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--resume", help="continue from OUT/train_state.pt of an earlier run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, value parsed as YAML (repeatable)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train data-parallel in N processes on this machine (torchrun; one per GPU with nccl, "
                        "else gloo on the CPU); train.batch_size is the global batch and must divide by N")


# The options a --nproc launch hands on to each process, as (flag, attribute); --out is added resolved.
FORWARDED = [("--config", "config"), ("--normal", "normal"), ("--anomaly", "anomaly"),
             ("--normal-classes", "normal_classes"), ("--anomaly-classes", "anomaly_classes"),
             ("--data-root", "data_root"), ("--epochs", "epochs"), ("--max-steps", "max_steps"),
             ("--device", "device"), ("--seed", "seed"), ("--resume", "resume")]


def _source(text: str, classes: str | None, skip_corrupt: bool) -> dict:
    return parse_source(text, classes, skip_corrupt).model_dump(mode="json", exclude_none=True)


def overrides_from_args(args: argparse.Namespace) -> dict:
    flags: dict = {}
    data: dict = {}
    if args.normal:
        data["normal"] = _source(args.normal, args.normal_classes, args.skip_corrupt)
    if args.anomaly:
        data["anomaly"] = _source(args.anomaly, args.anomaly_classes, args.skip_corrupt)
    if data:
        flags["data"] = data
    if args.epochs is not None:
        flags.setdefault("train", {})["epochs"] = args.epochs
    if args.max_steps is not None:
        flags.setdefault("train", {})["max_steps"] = args.max_steps
    for key in ("device", "seed", "data_root"):
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)
    return deep_merge(parse_overrides(args.set), flags)  # explicit flags win over --set


def _launch(args: argparse.Namespace, cfg: TrainConfig, out: Path) -> int:
    """`--nproc N`: checks what it can here, then runs torchrun with N processes of `python -m training`."""
    if args.nproc < 1:
        raise SettingsError(f"--nproc must be at least 1, got {args.nproc}")
    if ddp.launched_by_torchrun():
        raise SettingsError("--nproc launches torchrun itself; under torchrun leave it out")
    ddp.per_rank_batch(cfg.train.batch_size, args.nproc)  # refuses an indivisible batch before starting
    ddp.rank_device(cfg.device, args.nproc - 1)  # enough CUDA devices for the processes, if on CUDA
    forwarded: list[str] = []
    for flag, attr in FORWARDED:
        value = getattr(args, attr)
        if value is not None:
            forwarded += [flag, str(value)]
    if args.skip_corrupt:
        forwarded.append("--skip-corrupt")
    forwarded += [f"--set={item}" for item in args.set] + ["--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "training", *forwarded]
    env = dict(os.environ)
    root = str(Path(ddp.__file__).resolve().parents[1])  # the processes import this very training package
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    root_logger = logging.getLogger()  # the launcher's --log-level / --log-json, for every process
    env["AMA_LOG_LEVEL"] = logging.getLevelName(root_logger.getEffectiveLevel())
    if any(isinstance(h.formatter, JsonFormatter) for h in root_logger.handlers):
        env["AMA_LOG_JSON"] = "1"
    logging.getLogger(__name__).info("starting %d training processes: %s", args.nproc, " ".join(cmd))
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise RuntimeError(f"distributed training failed: torchrun exited with code {code} "
                           "(the failing process's error is above)")
    return 0


def _run_process(args: argparse.Namespace, cfg: TrainConfig, out: Path) -> int:
    """One torchrun process: init the process group, train its share; rank 0 writes and reports."""
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 logs for the job; the others only warnings
        root = logging.getLogger()
        root.setLevel(max(root.level, logging.WARNING))
    ctx = ddp.init_from_env(cfg.device)
    try:
        ckpt = train(cfg, out_dir=out, resume=args.resume, dist=ctx)
        ctx.barrier()  # the others wait for rank 0's evaluation and files
    finally:
        ddp.shutdown()
    if ckpt is not None:
        _report(out, ckpt)
    return 0


def _report(out: Path, ckpt) -> None:
    summary = {k: ckpt.metrics[k] for k in ("auroc_a", "auroc_r") if k in ckpt.metrics}
    print(f"wrote {out / 'model.pt'} (model {ckpt.model_id}) " + " ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    stopped = ckpt.metrics.get("stopped")
    if stopped:  # the guard stopped training: the run fails, with the last good step's model on disk
        raise TrainingStopped(f"{stopped['reason']} (the model of step {stopped['restored_step']}, the last good "
                              f"one, is in {out / 'model.pt'})")


def run(args: argparse.Namespace) -> int:
    config = args.config
    if config is None:
        if not args.normal:
            raise SettingsError("pass --config FILE, or --normal SOURCE to train on your own images")
        if not OWN_DATA_CONFIG.is_file():
            raise SettingsError(f"no --config given and the template {OWN_DATA_CONFIG} is missing; pass --config")
        config = OWN_DATA_CONFIG
    overrides = overrides_from_args(args)
    if args.skip_corrupt and not args.normal:
        raise SettingsError("--skip-corrupt applies to --normal/--anomaly; in a config set skip_corrupt: true on a source")
    replaced = tuple(f"data.{side}" for side in ("normal", "anomaly") if getattr(args, side))
    cfg = load_settings(TrainConfig, config, overrides, replace=replaced)
    out = Path(args.out) if args.out else Path("runs") / f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.nproc is not None:
        return _launch(args, cfg, out)
    if ddp.launched_by_torchrun():
        return _run_process(args, cfg, out)
    ckpt = train(cfg, out_dir=out, resume=args.resume)
    _report(out, ckpt)
    return 0
