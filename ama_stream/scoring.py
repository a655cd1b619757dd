"""Scorer: checkpoint -> R-scores (and, when asked, the critic's pooled features) for a batch of
images. Knows nothing of Kafka, nor of mu/sigma.

R(x) = || f(x, x) - f(x, G(E(x))) ||_1 with f the critic's sum-pooled penultimate features
(paper eq. 5); both halves of the pair go through the critic in ONE pass over the 2B batch.
z, log A (eq. 6), p-values and decisions are the Calibration's (ama_stream.calibration), the one
owner of mu/sigma:  `calibration.decide(scorer.score_images(images).r)`.

Runtimes: "torch" (default) runs the checkpoint's modules; "onnxruntime" and "openvino" run the
exported scoring graph (ama_stream.export / ama_stream.runtimes) on the CPU, same R within float32
rounding.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from . import feature_gaussian, ops
from .checkpoint import Checkpoint, load_checkpoint
from .model import bake_spectral_norm
from .runtimes import check_runtime
from .preprocess import fit_image, to_tensor
from .tiling import (TileBatch, TileGrid, hottest_region, image_scores, scale_region, stitch, tile_fitted, tile_images,
                     to_native)
from .progress import progress

log = logging.getLogger(__name__)

# Scorer precisions: None = no autocast.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Inspection:
    """What the Scorer sees in one image: its score (as Scores.r), the anomaly map float32 [H, W] at
    the image's own size or shrunk to a bounded side (higher = more anomalous; same aspect), and the
    (x, y, w, h) box of its hottest region in the image's own pixels."""

    score: float
    map: np.ndarray
    region: tuple[int, int, int, int]

    @property
    def map_max(self) -> float:
        return float(self.map.max())


@dataclass
class Scores:
    """The Scorer's results for B images: R-scores, numpy float64 [B], and with `return_features` the
    critic's sum-pooled features f, float32 [2B, W] ((x, x) rows, then (x, x_hat) rows). z, log A and
    decisions: `Calibration.decide(scores.r)`."""

    r: np.ndarray
    features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.r)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> the first CUDA device when one is usable, else the CPU; validates 'cuda:N'."""
    if device is None or str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use auto, cpu or cuda:N")
    return dev


class Scorer:
    """Loads a checkpoint once; scores batches of images on one device. Returns the model's score (R, or
    the Mahalanobis distance of R's feature difference for a checkpoint with a feature Gaussian), never
    z or log A.

    Speed options (each measured; docs/benchmarks.md has the numbers):
    - runtime: "torch" (default), or "onnxruntime" / "openvino": the exported scoring graph on the
      CPU (optional extras [onnx] / [openvino]); `runtime_model` names an `ama-stream export` file
      (.onnx, or .xml for openvino; an INT8-quantized graph too), else the graph is exported in
      memory at construction (a few seconds). `runtime_threads` (default: torch's thread count).
      `reconstruct` and `feature_map` always run the torch modules.
    - channels_last: NHWC activations. Default (None): on for the CPU, where it measured faster,
      off on CUDA until measured there.
    - precision: "float32" (default), or "bfloat16"/"float16" autocast for E, G and the critic; the
      fused tail reads the half-precision activation and accumulates in float32 (float16 is refused
      for a model without spectral norm: its unbounded critic overflows float16). On this project's
      CPUs (AVX2, no native bf16/fp16 math) autocast measured several times slower: meant for GPUs.
    - compile_mode: None (eager, default) or a torch.compile mode ("default", "reduce-overhead" =
      CUDA graphs, "max-autotune") for E, G and the critic. Shapes are static: each new batch size
      compiles again, so use it with fixed batch sizes.
    """

    def __init__(
        self,
        checkpoint: str | Checkpoint,
        device: str | torch.device | None = "auto",
        *,
        channels_last: bool | None = None,
        precision: str = "float32",
        compile_mode: str | None = None,
        runtime: str = "torch",
        runtime_model: str | None = None,
        runtime_threads: int | None = None,
        max_patches: int = 512,
    ):
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}, got {precision!r}")
        self.runtime = check_runtime(runtime)
        if runtime == "torch" and runtime_model is not None:
            raise ValueError("a runtime model (exported graph) runs with runtime onnxruntime or openvino, not torch")
        if runtime != "torch":
            if precision != "float32" or compile_mode is not None:
                raise ValueError(f"precision and compile_mode apply to the torch runtime, not {runtime}")
            if device is not None and str(device) != "auto" and resolve_device(device).type != "cpu":
                raise ValueError(f"runtime {runtime} runs on the CPU; use device cpu (or auto) with it")
            device = "cpu"
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        if precision == "float16" and not self.checkpoint.model.spectral_norm:
            # nothing bounds such a critic: trained ones reach activations of ~1e8, float16 ends at 65504
            raise ValueError("precision float16 cannot score a model trained without spectral norm (its critic's "
                             "activations overflow float16); use bfloat16, which has float32's range, or float32")
        self.device = resolve_device(device)
        self.channels_last = self.device.type == "cpu" if channels_last is None else bool(channels_last)
        self.precision = precision
        self.compile_mode = compile_mode
        self.max_patches = max(1, int(max_patches))  # model inputs per forward when scoring tiled images
        gaussian = self.checkpoint.feature_gaussian
        if gaussian is not None and self.checkpoint.preprocess.patched:
            raise ValueError("score mahalanobis (a feature Gaussian) is for whole-image models, not patch models")
        stats = self.checkpoint.position_stats
        self.positions_t = {k: v.float() for k, v in stats.items()} if stats is not None else None
        self.positions = {k: v.numpy().astype(np.float64) for k, v in self.positions_t.items()} if stats else None
        self._memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        model = self.checkpoint.build_model("cpu")
        with torch.no_grad():
            bake_spectral_norm(model)
        self.model = model.to(self.device, memory_format=self._memory_format).eval()
        self.gaussian = {k: v.to(self.device) for k, v in gaussian.items()} if gaussian is not None else None
        self.spec = self.checkpoint.preprocess
        self._critic_map = self._critic_map_eager
        if compile_mode is not None:
            self._critic_map = torch.compile(self._critic_map_eager, mode=compile_mode, dynamic=False, fullgraph=True)
        self.graph = None
        if runtime != "torch":
            from .export import onnx_proto  # the exporter (and onnx) load only for these runtimes
            from .runtimes import open_runtime

            self.graph = open_runtime(runtime, self.checkpoint, runtime_model, runtime_threads,
                                      export=lambda: onnx_proto(self.checkpoint))
            if gaussian is not None and self.graph.metadata.get("quantized") == "int8":
                raise ValueError(feature_gaussian.INT8_REFUSED)
        log.debug(
            "scorer on %s: runtime=%s channels_last=%s precision=%s compile_mode=%s ops backend=%s",
            self.device, runtime, self.channels_last, precision, compile_mode, ops.backend(self.device),
        )

    @property
    def model_id(self) -> str:
        return self.checkpoint.model_id

    def fit(self, images):
        """Decoded uint8 images (HxW or HxWxC, any size) -> fitted: uint8 [B, S, S, C] for a whole-image
        model; for a patch model an object array of the images at their working scale (preprocess.fit_image)."""
        if self.spec.patched:
            out = np.empty(len(images), dtype=object)
            for i, img in enumerate(images):
                out[i] = fit_image(img, self.spec)
            return out
        if len(images):
            return np.stack([fit_image(img, self.spec) for img in images])
        return np.zeros((0, self.spec.image_size, self.spec.image_size, self.spec.channels), dtype=np.uint8)

    def prepare(self, images) -> TileBatch:
        """Decoded uint8 images (any sizes) -> every model input they make (one per image, or its
        patches), with each image's grid: what score_tiles takes."""
        return tile_images(images, self.spec)

    def _critic_map_eager(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.critic_map(x)

    @torch.inference_mode()
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Critic activation h [2B, W, 8, 8] for the stacked pairs (x, x) and (x, G(E(x))) (torch modules)."""
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self._memory_format)
        dtype = AUTOCAST_DTYPES[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return self._critic_map(x)

    def _empty(self, return_features: bool) -> Scores:
        return Scores(np.zeros(0), np.zeros((0, self.checkpoint.model.disc_width), np.float32) if return_features else None)

    def _scores(self, r, features, return_features: bool) -> Scores:
        """The score of each input: R, or the Mahalanobis distance of the feature difference where the
        checkpoint carries a feature Gaussian (score mahalanobis)."""
        to_np = lambda t: t.detach().to("cpu").numpy() if isinstance(t, torch.Tensor) else np.asarray(t)  # noqa: E731
        if self.gaussian is not None:
            f = torch.as_tensor(features)
            r = feature_gaussian.distance(f.to(self.gaussian["mean"].device), self.gaussian)
        return Scores(to_np(r).astype(np.float64), to_np(features).astype(np.float32, copy=False) if return_features else None)

    @torch.inference_mode()
    def score_tensor(self, x: torch.Tensor, *, return_features: bool = False) -> Scores:
        """x [B, C, S, S] in [-1, 1] -> Scores (R, and the pooled features with `return_features`)."""
        expected = (self.spec.channels, self.spec.image_size, self.spec.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input [B, {expected[0]}, {expected[1]}, {expected[2]}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return self._empty(return_features)
        if self.graph is not None:
            r, f = self.graph.run(self.graph.feed(x))
            return self._scores(r, f, return_features)
        with_features = return_features or self.gaussian is not None  # the distance needs them
        out = ops.pair_rscore(self.feature_map(x), return_features=with_features)
        return self._scores(*(out if with_features else (out, None)), return_features)

    def score_fitted(self, images: np.ndarray, *, return_features: bool = False) -> Scores:
        """uint8 [B, S, S, C] images already at a whole-image model's size (Scorer.fit) -> Scores. A graph
        that takes uint8 gets them as they are; otherwise they are scaled to [-1, 1] first."""
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (
                self.spec.image_size, self.spec.image_size, self.spec.channels):
            raise ValueError(f"expected uint8 [B, {self.spec.image_size}, {self.spec.image_size}, {self.spec.channels}], "
                             f"got {images.dtype} {tuple(images.shape)}")
        if self.graph is not None and self.graph.input_kind == "uint8":
            if len(images) == 0:
                return self._empty(return_features)
            r, f = self.graph.run(np.ascontiguousarray(images))
            return self._scores(r, f, return_features)
        return self.score_tensor(to_tensor(images), return_features=return_features)

    @torch.inference_mode()
    def _patch_outputs(self, tiles: np.ndarray, maps: bool) -> tuple[np.ndarray, torch.Tensor | None]:
        """The score of every model input (uint8 [n, P, P, C]) and, with `maps`, its anomaly map [n, h, w]
        (the critic's resolution), in chunks of max_patches inputs per forward."""
        r_parts, map_parts = [], []
        for i in range(0, len(tiles), self.max_patches):
            chunk = tiles[i:i + self.max_patches]
            if maps:  # the map needs the critic's activation: the torch modules, whatever the runtime
                h = self.feature_map(to_tensor(chunk))
                r, cell = ops.pair_rscore_map(h)
                map_parts.append(cell.float().cpu())
                if self.gaussian is not None:  # the score is the distance; the map stays R's per-position part
                    r = feature_gaussian.distance(ops.pair_rscore(h, return_features=True)[1], self.gaussian)
                r_parts.append(r.cpu().numpy())
            else:
                r_parts.append(self.score_fitted(chunk).r)
        r = np.concatenate(r_parts).astype(np.float64) if r_parts else np.zeros(0)
        return r, (torch.cat(map_parts) if map_parts else None) if maps else None

    def tile(self, fitted, natives=None) -> TileBatch:
        """Images already fitted (Scorer.fit: a uint8 [B, S, S, C] array or a patch model's object array)
        -> their TileBatch. `natives`: the images' (height, width) as they arrived, the size their maps
        are returned at (default: the fitted size)."""
        natives = [img.shape[:2] for img in fitted] if natives is None else [tuple(int(v) for v in n[:2]) for n in natives]
        if isinstance(fitted, np.ndarray) and fitted.dtype == np.uint8 and fitted.ndim == 4 and not self.spec.patched:
            return TileBatch(fitted, [TileGrid(*img.shape[:2], self.spec.image_size, (0,), (0,), native)
                                      for img, native in zip(fitted, natives)])
        return tile_fitted(fitted, natives, self.spec)

    def representative_inputs(self, fitted) -> np.ndarray:
        """The model input that stands for each fitted image, uint8 [B, S, S, C]: the image itself, or a
        patch model's highest-scoring patch (for reconstruction figures)."""
        batch = self.tile(fitted)
        if not self.spec.patched:
            return batch.tiles
        patch_r, _ = self._patch_outputs(batch.tiles, maps=False)
        if self.positions is not None:
            patch_r = np.concatenate([(r - self.positions["patch_mean"].ravel()) / self.positions["patch_std"].ravel()
                                      for r in batch.split(patch_r)])
        bounds = batch.bounds
        picks = [bounds[i] + int(np.nanargmax(r)) if np.isfinite(r).any() else bounds[i]
                 for i, r in enumerate(batch.split(patch_r))]
        return batch.tiles[picks]

    def _image_scores(self, patch_r: np.ndarray, batch: TileBatch) -> np.ndarray:
        """Patch R-scores -> image scores: with per-position statistics, each patch's R as a z-score
        against the good images' R at that position first."""
        if self.positions is not None:
            mean, std = self.positions["patch_mean"], self.positions["patch_std"]
            for grid in batch.grids:
                if grid.shape != mean.shape:
                    raise ValueError(f"an image tiled as {grid.shape} patches, but the model's per-position "
                                     f"statistics are for {mean.shape} (fit images with Scorer.fit)")
            patch_r = np.concatenate([(r - mean.ravel()) / std.ravel() for r in batch.split(patch_r)]) \
                if len(batch) else patch_r
        return image_scores(patch_r, batch, self.spec.top_k)

    def score_tiles(self, batch: TileBatch) -> np.ndarray:
        """Image scores of a TileBatch, float64 [B]: a whole-image model's R, or for a patch model the
        mean of each image's top_k patch scores (R, or its z-score at that position when the model has
        per-position statistics). Every patch of the batch goes through the model together (in chunks
        of max_patches)."""
        patch_r, _ = self._patch_outputs(batch.tiles, maps=False)
        return self._image_scores(patch_r, batch)

    def scores_and_cells(self, batch: TileBatch) -> tuple[np.ndarray, list[torch.Tensor] | None]:
        """Image scores and, from the same forward, each image's per-patch maps (the critic's
        resolution, small), for `inspection` of the few that alert. The torch runtime gives both in
        one pass (ops.pair_rscore_map); an exported graph gives scores only (cells None)."""
        if self.graph is not None or not isinstance(batch, TileBatch):  # a bare input tensor: scores only
            return self.r_scores(batch, batch_size=max(1, len(batch))), None
        patch_r, cells = self._patch_outputs(batch.tiles, maps=True)
        return self._image_scores(patch_r, batch), batch.split(cells)

    def inspection(self, score: float, cells: torch.Tensor, grid: TileGrid, max_side: int | None = None) -> Inspection:
        """One image's map and hottest region, from its per-patch maps. The map is at the image's own
        size, or with `max_side` no larger than that (the agent: a 4096x4096 frame's map at its own size
        is 64 MiB of float32 per alert); the region is in the image's own pixels either way."""
        anomaly_map = to_native(self.fitted_map(cells, grid), grid, self.spec, max_side)
        region = scale_region(hottest_region(anomaly_map), anomaly_map.shape, grid.native)
        return Inspection(float(score), anomaly_map, region)

    def fitted_map(self, cells: torch.Tensor, grid: TileGrid) -> torch.Tensor:
        """One image's per-patch maps -> its map over the fitted image (with per-position statistics:
        a z-score per pixel against the good images' maps)."""
        canvas = stitch(cells, grid)
        if self.positions is not None:
            canvas = (canvas - self.positions_t["map_mean"]) / self.positions_t["map_std"]
        return canvas

    def inspect_tiles(self, batch: TileBatch, max_side: int | None = None) -> list[Inspection]:
        """Score, anomaly map (at each image's own size, or bounded by `max_side`) and hottest region per
        image, from the same forward that gives the score (the map op returns R and the map together)."""
        patch_r, cells = self._patch_outputs(batch.tiles, maps=True)
        scores = self._image_scores(patch_r, batch)
        return [self.inspection(score, cell, grid, max_side)
                for score, grid, cell in zip(scores, batch.grids, batch.split(cells))]

    def raw_position_outputs(self, batch: TileBatch) -> tuple[np.ndarray, np.ndarray]:
        """For fitting per-position statistics on good images of one working size: their patch R-scores
        [N, rows, cols] and their raw stitched maps [N, height, width] (no statistics applied)."""
        grids = batch.grids
        if len({(g.height, g.width) for g in grids}) != 1:
            raise ValueError("per-position statistics need images of one working size")
        patch_r, cells = self._patch_outputs(batch.tiles, maps=True)
        r = np.stack([part.reshape(g.shape) for part, g in zip(batch.split(patch_r), grids)])
        maps = np.stack([stitch(c, g).numpy() for c, g in zip(batch.split(cells), grids)])
        return r, maps

    def inspect(self, images) -> list[Inspection]:
        """Decoded uint8 images (any sizes) -> per image its score, anomaly map and hottest region."""
        return self.inspect_tiles(self.prepare(images))

    def anomaly_maps(self, images) -> list[np.ndarray]:
        """Decoded uint8 images (any sizes) -> one float32 map per image at its own size (higher = more
        anomalous): the critic's per-position feature difference, stitched across patches."""
        return [item.map for item in self.inspect(images)]

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """G(E(x)) for model inputs x [B, C, S, S] in [-1, 1], float32 on the CPU (for reports)."""
        x = x.to(self.device).contiguous(memory_format=self._memory_format)
        return self.model.generator(self.model.encoder(x)).float().cpu().contiguous()

    def score_images(self, images, *, return_features: bool = False) -> Scores:
        """Decoded uint8 images (any sizes) -> Scores (features: whole-image models only)."""
        if self.spec.patched:
            if return_features:
                raise ValueError("return_features is for whole-image models; a patch model's image has many patches")
            return Scores(self.score_tiles(self.prepare(images)))
        return self.score_fitted(self.fit(images), return_features=return_features)

    def _score_chunk(self, chunk) -> np.ndarray:
        if isinstance(chunk, TileBatch):
            return self.score_tiles(chunk)
        if isinstance(chunk, torch.Tensor):
            return self.score_tensor(chunk).r
        if chunk.dtype == object:  # fitted images of a patch model (any sizes)
            return self.score_tiles(self.tile(chunk))
        return self.score_fitted(chunk).r

    def r_scores(self, x, batch_size: int = 256, desc: str | None = None) -> np.ndarray:
        """Image scores of many inputs in chunks of `batch_size` images: a model-input tensor, uint8
        [N, S, S, C] images already fitted to a whole-image model (converted chunk by chunk, so a large
        set is never one float copy), a patch model's fitted images (object array), or a TileBatch.
        `desc` shows progress under that name."""
        out = []
        with progress(total=len(x), desc=desc, unit="img") if desc else contextlib.nullcontext() as bar:
            for i in range(0, len(x), batch_size):
                chunk = x.select(range(i, min(i + batch_size, len(x)))) if isinstance(x, TileBatch) else x[i : i + batch_size]
                out.append(self._score_chunk(chunk))
                if bar is not None:
                    bar.update(len(out[-1]))
        return np.concatenate(out) if out else np.zeros(0)
