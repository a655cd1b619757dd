"""`ama-stream calibrate`: fit mu/sigma and the alert threshold on known-normal data, without labels.

Scores every frame of the source with the checkpoint's Scorer, streams the R-scores into float64
Welford statistics and a bounded sample (ama_stream.calibration.CalibrationFitter), writes the
calibration atomically and prints a short summary. A running agent watching the file picks it up.
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Iterable, Iterator

import numpy as np

from ama_stream.calibration import (
    DEFAULT_MAX_SAMPLE,
    DEFAULT_MIN_CAMERA_FRAMES,
    DEFAULT_POLICY,
    DEFAULT_TARGET_FPR,
    POLICIES,
    CalibrationFitter,
    Policy,
)
from ama_stream.preprocess import FitTally, native_shape
from ama_stream.progress import progress
from ama_stream.runtimes import add_runtime_options

log = logging.getLogger("ama_stream.calibrate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="the model checkpoint to calibrate")
    parser.add_argument("--source", required=True, metavar="SPEC",
                        help="known-normal frames: FORMAT:ROOT (folder:/data/line3/good, idx:fashion-mnist, npz:/x.npz, "
                             "elpv:elpv), kafka:TOPIC with --bootstrap, or `heldout`: the good images the checkpoint "
                             "held out from training")
    parser.add_argument("--out", required=True, metavar="FILE", help="calibration file to write (atomically)")
    parser.add_argument("--limit", type=int, metavar="N", help="use at most N frames")
    parser.add_argument("--policy", choices=POLICIES,
                        help="two-sided: |z| large; upper: only high R; sigma: |z| > K (default: the policy the "
                             "model was trained for, its config's `policy`, else two-sided)")
    parser.add_argument("--target-fpr", type=float, metavar="F",
                        help=f"false-alarm rate on normal data for two-sided/upper (default {DEFAULT_TARGET_FPR})")
    parser.add_argument("--k", type=float, metavar="K", help="|z| threshold of the sigma policy (default 3)")
    parser.add_argument("--per-camera", action="store_true",
                        help="also fit one entry per camera (kafka: camera-id header or key; files: the class "
                             "folder, or --camera-id); other cameras use the global entry")
    parser.add_argument("--camera-id", metavar="ID", help="file sources: the camera these frames come from")
    parser.add_argument("--min-camera-frames", type=int, default=DEFAULT_MIN_CAMERA_FRAMES, metavar="N",
                        help=f"cameras with fewer frames get no entry of their own (default {DEFAULT_MIN_CAMERA_FRAMES})")
    parser.add_argument("--max-sample", type=int, default=DEFAULT_MAX_SAMPLE, metavar="N",
                        help=f"scores kept per entry for quantiles and p-values (default {DEFAULT_MAX_SAMPLE})")
    parser.add_argument("--classes", metavar="A,B", help="class selection of a file --source")
    parser.add_argument("--split", choices=["train", "test", "all"], help="split of a file --source (default: all)")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="file sources: skip and count undecodable images instead of stopping at the first")
    parser.add_argument("--data-root", metavar="DIR", help="where relative roots resolve (default: $AMA_DATA_ROOT)")
    parser.add_argument("--device", default="auto", metavar="D", help="auto, cpu or cuda:N (default auto)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="frames per scoring batch (default 256)")
    add_runtime_options(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the score sample and of the file split")
    parser.add_argument("--bootstrap", metavar="HOST:PORT", help="Kafka bootstrap servers (kafka:TOPIC, --publish)")
    parser.add_argument("--window-s", type=float, metavar="S",
                        help="kafka: read the frames of the last S seconds (by timestamp) instead of the whole topic")
    parser.add_argument("--idle-timeout-s", type=float, default=10.0, metavar="S",
                        help="kafka: stop when no frame arrived for S seconds (default 10)")
    parser.add_argument("--connect-timeout-s", type=float, default=10.0, metavar="S",
                        help="kafka: give up when the broker cannot be reached for this long (default 10)")
    parser.add_argument("--no-sensitivity", action="store_true",
                        help="skip the check of which synthetic defects the new threshold catches (about a minute "
                             "for camera-size frames on a CPU)")
    parser.add_argument("--publish", metavar="TOPIC",
                        help="also publish the calibration to this control topic (key: the model id) for running agents")
    parser.add_argument("--config", metavar="FILE", help="kafka: YAML with a kafka: section (security settings)")


def _check(args: argparse.Namespace, kafka: bool) -> Policy:
    for name in ("limit", "batch_size", "min_camera_frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.max_sample < 2:
        raise ValueError(f"--max-sample must be at least 2, got {args.max_sample}")
    if args.policy == "sigma" and args.target_fpr is not None:
        raise ValueError("--target-fpr applies to the two-sided and upper policies; the sigma policy takes --k")
    if args.policy != "sigma" and args.k is not None:
        raise ValueError(f"--k applies to the sigma policy, not {args.policy} (which takes --target-fpr)")
    if (kafka or args.publish) and not args.bootstrap:
        raise ValueError(f"{'a kafka: source' if kafka else '--publish'} needs --bootstrap HOST:PORT")
    if kafka:
        if args.camera_id or args.classes or args.split or args.skip_corrupt:
            raise ValueError("--camera-id, --classes, --split and --skip-corrupt apply to file sources "
                             "(kafka frames carry camera-id; undecodable frames are always skipped and counted)")
    elif args.window_s is not None:
        raise ValueError("--window-s applies to kafka: sources only")
    elif (args.bootstrap or args.config) and not args.publish:
        raise ValueError("--bootstrap and --config apply to kafka: sources and --publish only")
    if args.connect_timeout_s <= 0:
        raise ValueError(f"--connect-timeout-s must be positive, got {args.connect_timeout_s}")
    if args.window_s is not None and args.window_s <= 0:
        raise ValueError(f"--window-s must be positive, got {args.window_s}")
    return Policy.make(args.policy, args.target_fpr, args.k)


HELDOUT = "heldout"


def _heldout_spec(checkpoint, data_root):
    """The checkpoint's held-out normal images: its training source's test split, split as in training."""
    from ama_stream.sources import DEFAULT_TEST_FRACTION, SourceSpec

    data = (checkpoint.train_config or {}).get("data") or {}
    if not data.get("normal"):
        raise ValueError("--source heldout: the checkpoint records no training source; name the frames with --source")
    spec = SourceSpec.model_validate(data["normal"]).with_split("test")
    return spec, int(data.get("split_seed", 0)), float(data.get("test_fraction", DEFAULT_TEST_FRACTION))


def _file_frames(args: argparse.Namespace, checkpoint) -> Iterator[tuple[np.ndarray, str | None]]:
    """(native image, camera id) of a file source."""
    from ama_stream.sources import DEFAULT_TEST_FRACTION, iter_images, parse_source, source_classes

    if args.source.strip() == HELDOUT:
        spec, split_seed, test_fraction = _heldout_spec(checkpoint, args.data_root)
    else:
        spec = parse_source(args.source, args.classes, args.skip_corrupt).with_split(args.split)
        split_seed, test_fraction = args.seed, DEFAULT_TEST_FRACTION
    if args.skip_corrupt:  # the held-out source comes from the checkpoint
        spec = spec.model_copy(update={"skip_corrupt": True})
    items = iter_images(spec, args.data_root, seed=split_seed, test_fraction=test_fraction)
    class_names = source_classes(spec, args.data_root) if args.per_camera and not args.camera_id else ()
    for _item_id, image, label in items:
        if args.camera_id:
            yield image, args.camera_id
        else:
            yield image, (class_names[label] if class_names and label is not None else None)


SENSITIVITY_FRAMES = 40  # good frames the sensitivity check implants its synthetic defects into


def _print_sensitivity(scorer, calibration, good: list[np.ndarray], seed: int, checkpoint) -> None:
    """What the new threshold catches: the synthetic-defect ladder in the first good frames (the same
    check as after training; these frames were calibrated on, never trained on)."""
    from ama_stream import sensitivity

    result = sensitivity.check(lambda images: scorer.score_images(images).r, calibration, good, seed=seed,
                               seen_in_training=sensitivity.seen_kinds(checkpoint.train_config))
    print("  what this threshold catches (synthetic defects, px of the frames):")
    for line in result.table():
        print("    " + line)
    if result.warning():
        print("  " + result.warning())


def _kafka_settings(args: argparse.Namespace):
    from ama_stream.agent.settings import ProduceSettings
    from ama_stream.settings import load_settings

    return load_settings(ProduceSettings, args.config, {"kafka": {"bootstrap_servers": args.bootstrap}})


def _kafka_frames(args: argparse.Namespace, stats) -> Iterator[tuple[np.ndarray, str | None]]:
    """(decoded frame, camera id) of a topic, read outside any consumer group (no offsets committed)."""
    from ama_stream.kafka_tools.replay import topic_frames

    settings = _kafka_settings(args)
    topic = args.source.strip().split(":", 1)[1].strip()
    if not topic:
        raise ValueError(f"source {args.source!r}: kafka:TOPIC needs a topic name")
    return topic_frames(settings.kafka, topic, limit=args.limit, window_s=args.window_s,
                        idle_timeout_s=args.idle_timeout_s, stats=stats, connect_timeout_s=args.connect_timeout_s)


def run(args: argparse.Namespace) -> int:
    from ama_stream.checkpoint import load_checkpoint
    from ama_stream.scoring import Scorer
    from ama_stream.sources import is_kafka_source

    kafka = is_kafka_source(args.source)
    checkpoint = load_checkpoint(args.checkpoint)
    if args.policy is None:
        args.policy = (checkpoint.train_config or {}).get("policy") or DEFAULT_POLICY
        log.info("policy %s (the model's default; --policy overrides it)", args.policy)
    policy = _check(args, kafka)
    scorer = Scorer(checkpoint, args.device, runtime=args.runtime, runtime_model=args.runtime_model)
    replay = None
    if kafka:
        from ama_stream.kafka_tools.replay import ReplayStats

        replay = ReplayStats()
        frames = _kafka_frames(args, replay)
    else:
        frames = _file_frames(args, scorer.checkpoint)
    fitter = CalibrationFitter(per_camera=args.per_camera, max_sample=args.max_sample, seed=args.seed)
    started = time.monotonic()
    kept: list[np.ndarray] = []  # the first good frames, for the sensitivity at the new threshold

    def keeping(items):
        for image, camera in items:
            if len(kept) < SENSITIVITY_FRAMES:
                kept.append(image)
            yield image, camera

    tally = score_frames(scorer, keeping(frames), fitter, args.batch_size, args.limit)
    misfit = tally.message("frames")
    if misfit:
        (log.warning if tally.serious else log.info)("%s", misfit)
    if replay is not None and replay.undecodable:
        log.warning("skipped %d undecodable frames (%s)", sum(replay.undecodable.values()),
                    ", ".join(f"{reason}: {n}" for reason, n in sorted(replay.undecodable.items())))
    if fitter.n + fitter.skipped_nonfinite == 0:
        raise ValueError(f"{args.source}: no frames to calibrate on")
    if fitter.skipped_nonfinite:
        log.warning("skipped %d frames whose R-score is not finite", fitter.skipped_nonfinite)

    source = {"spec": args.source}
    for key in ("classes", "split", "limit", "camera_id", "window_s"):
        if getattr(args, key, None) is not None:
            source[key] = getattr(args, key)
    calibration, notes = fitter.finish(scorer.model_id, policy, source, args.min_camera_frames)
    for note in notes + calibration.warnings():
        log.warning("%s", note)
    calibration.save(args.out)
    elapsed = time.monotonic() - started
    print(calibration.summary())
    print(f"  scored {fitter.n} frames in {elapsed:.1f} s; wrote {args.out}")
    if not args.no_sensitivity and kept:
        _print_sensitivity(scorer, calibration, kept, args.seed, checkpoint)
    if args.publish:
        _publish(args, calibration)
        print(f"  published to topic {args.publish} (key {calibration.model_id})")
    return 0


def _publish(args: argparse.Namespace, calibration) -> None:
    """The calibration document on the control topic that agents with `topics.calibration` read."""
    from kafka.errors import KafkaError

    from ama_stream.agent.kafka_io import make_producer
    from ama_stream.agent.signing import SIGNATURE_HEADER, key_from_env, signature

    settings = _kafka_settings(args)
    value, key = calibration.to_json_bytes(), key_from_env()
    headers = [(SIGNATURE_HEADER, signature(key, value))] if key else []  # agents with a control key need it
    try:
        producer = make_producer(settings.kafka, settings.producer, connect_timeout_s=args.connect_timeout_s)
        try:
            producer.send(args.publish, key=calibration.model_id.encode(), value=value, headers=headers).get(30)
        finally:
            producer.close(timeout=10)
    except KafkaError as exc:
        raise RuntimeError(f"publishing the calibration to {args.publish} failed (the file {args.out} was written): "
                           f"{type(exc).__name__}: {exc}") from None


def score_frames(scorer, frames: Iterable[tuple[np.ndarray, str | None]], fitter: CalibrationFitter,
                 batch_size: int = 256, limit: int | None = None) -> FitTally:
    """Scores (image, camera id) pairs in batches into `fitter`, at most `limit`, with progress.
    Returns the tally of frames that did not fit the model as they were (size, channels)."""
    tally = FitTally(scorer.spec)
    images: list[np.ndarray] = []
    cameras: list[str | None] = []

    def flush() -> None:
        if images:
            fitter.update(scorer.score_images(images).r, cameras)
            bar.update(len(images))
            images.clear()
            cameras.clear()

    with progress(total=limit, desc="calibrating", unit="frame") as bar:
        for count, (image, camera) in enumerate(frames, start=1):
            tally.add(native_shape(image))
            images.append(image)
            cameras.append(camera)
            if len(images) == batch_size:
                flush()
            if limit is not None and count >= limit:
                break
        flush()
    return tally
