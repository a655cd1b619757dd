"""A report a person can look at: PNG plots and one report.html that shows them with the metrics.

Written into every run folder by the trainer and by `ama-stream evaluate --plots DIR`:

    scores.png           R-score densities, normal vs anomaly (the paper's Fig. 4), or of the
                         held-out good images when there are no anomalies
    roc.png, pr.png      ROC and precision-recall curves of the R- and A-scores (anomalies only)
    losses.png           the logged training values over the steps (from metrics.csv)
    reconstructions.png  inputs, reconstructions G(E(x)) and |x - G(E(x))| of the lowest- and
                         highest-scored images
    report.html          all of the above on one page, with the metrics table

Files are written atomically (ama_stream.fileio), so a reader never sees half a PNG.
"""
from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402
from PIL import Image  # noqa: E402

from ama_stream.fileio import atomic_write_bytes  # noqa: E402

PLOT_DPI = 110
GRID_IMAGES = 8  # images per row of the reconstruction grid (best and worst)


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path.name


def plot_scores(path: Path, r_normal: np.ndarray, r_anomaly: np.ndarray | None = None,
                normal_label: str = "normal", score_label: str = "R-score") -> str:
    """Histogram densities of the model's score (log-spaced bins when it spans decades)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    values = [r_normal] if r_anomaly is None or len(r_anomaly) == 0 else [r_normal, r_anomaly]
    allv = np.concatenate(values)
    allv = allv[np.isfinite(allv)]
    lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
    log_bins = lo > 0 and hi / lo > 50
    bins = np.geomspace(lo, hi, 60) if log_bins else np.linspace(lo, hi if hi > lo else lo + 1, 60)
    ax.hist(r_normal, bins=bins, density=True, alpha=0.6, label=f"{normal_label} (n={len(r_normal)})", color="tab:blue")
    if len(values) == 2:
        ax.hist(r_anomaly, bins=bins, density=True, alpha=0.6, label=f"anomaly (n={len(r_anomaly)})", color="tab:red")
    if log_bins:
        ax.set_xscale("log")
    ax.set_xlabel(score_label)
    ax.set_ylabel("density")
    ax.set_title(f"{score_label} densities")
    ax.legend()
    return _save(fig, path)


def plot_roc_pr(roc_path: Path, pr_path: Path, labels: np.ndarray, scores: Mapping[str, np.ndarray]) -> list[str]:
    """ROC and PR curves of each named score (high = anomalous), anomalies the positive class."""
    fig_roc, ax_roc = plt.subplots(figsize=(4.6, 4.2))
    fig_pr, ax_pr = plt.subplots(figsize=(4.6, 4.2))
    for name, score in scores.items():
        fpr, tpr, _ = roc_curve(labels, score)
        ax_roc.plot(fpr, tpr, label=name)
        precision, recall, _ = precision_recall_curve(labels, score)
        ax_pr.plot(recall, precision, label=name)
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.set(xlabel="false-alarm rate", ylabel="recall", title="ROC")
    ax_pr.axhline(float(np.mean(labels)), color="k", ls=":", lw=0.8)
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall")
    ax_roc.legend(loc="lower right")
    ax_pr.legend(loc="lower left")
    return [_save(fig_roc, roc_path), _save(fig_pr, pr_path)]


def read_metrics_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of metrics.csv as float arrays (empty cells are NaN)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    cols = {k: [] for k in rows[0]}
    for row in rows:
        for k in cols:
            try:
                cols[k].append(float(row.get(k) or "nan"))
            except ValueError:
                cols[k].append(math.nan)
    return {k: np.asarray(v) for k, v in cols.items()}


def plot_losses(path: Path, columns: Mapping[str, np.ndarray]) -> str | None:
    """One small panel per logged value against the step."""
    names = [k for k in columns if k not in ("step", "epoch", "elapsed_s")]
    if "step" not in columns or not names:
        return None
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.plot(columns["step"], columns[name], lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _to_display(images: np.ndarray) -> np.ndarray:
    """[N, C, S, S] in [-1, 1] -> [N, S, S] or [N, S, S, 3] in [0, 1]."""
    x = np.clip((images + 1.0) / 2.0, 0.0, 1.0)
    return x[:, 0] if x.shape[1] == 1 else np.transpose(x, (0, 2, 3, 1))


def plot_reconstructions(path: Path, rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> str:
    """rows: (title, inputs [N, C, S, S], reconstructions, R-scores); each gives 3 image rows:
    input, G(E(x)) and |x - G(E(x))|."""
    n = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(3 * len(rows), n, figsize=(1.2 * n, 1.4 * 3 * len(rows)), squeeze=False)
    fig.subplots_adjust(hspace=0.45)
    for block, (title, x, x_hat, r) in enumerate(rows):
        panels = (_to_display(x), _to_display(x_hat), np.abs(_to_display(x) - _to_display(x_hat)))
        for j, (kind, images) in enumerate(zip(("input", "G(E(x))", "|x - G(E(x))|"), panels)):
            for i in range(n):
                ax = axes[3 * block + j, i]
                ax.axis("off")
                if i < len(images):
                    ax.imshow(images[i], cmap="gray" if images[i].ndim == 2 else None, vmin=0, vmax=1)
                    if j == 0:
                        ax.set_title(f"R={r[i]:.3g}", fontsize=7)
            axes[3 * block + j, 0].text(-0.1, 0.5, kind, transform=axes[3 * block + j, 0].transAxes, ha="right",
                                        va="center", fontsize=8)
        axes[3 * block, 0].text(-0.1, 1.35, title, transform=axes[3 * block, 0].transAxes, fontsize=9, weight="bold")
    return _save(fig, path)


def plot_overlays(path: Path, rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]) -> str:
    """rows: (title, image uint8 HxWxC as the model saw it, anomaly map at the image's own size, mask or
    None); each panel shows the image with the map as a heat overlay (one colour scale for the
    figure) and the defect mask's outline in green."""
    lo = min(float(np.min(m)) for _t, _i, m, _k in rows)
    hi = max(float(np.max(m)) for _t, _i, m, _k in rows)
    cols = min(4, len(rows))
    n_rows = math.ceil(len(rows) / cols)
    first = rows[0][2]
    aspect = first.shape[0] / max(first.shape[1], 1)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 4 * aspect * n_rows + 0.6), squeeze=False)
    for ax, (title, image, anomaly_map, mask) in zip(axes.flat, rows):
        h, w = anomaly_map.shape
        shown = np.asarray(Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).resize((w, h)))
        ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None)
        ax.imshow(anomaly_map.astype(np.float32), cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
        if mask is not None and mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def top_overlays(scorer, groups, masks: dict | None = None, count: int = 4) -> list:
    """The rows plot_overlays draws: per group (label, fitted images, native shapes [N, >=2], scores,
    ids), its `count` highest-scored images with their anomaly maps (one more forward over those) and,
    given a mask index (training.pixelmaps.mask_index), their defect masks."""
    from .pixelmaps import map_name, read_mask

    rows = []
    for label, images, shapes, scores, ids in groups:
        if images is None or len(scores) == 0 or shapes is None:
            continue
        top = np.argsort(-np.nan_to_num(np.asarray(scores, float), nan=-np.inf))[:count]
        for i, item in zip(top, scorer.inspect_tiles(scorer.tile(images[top], shapes[top]))):
            name = map_name(ids[i])[:-4] if ids else str(i)
            mask = read_mask(masks, ids[i], tuple(int(v) for v in shapes[i][:2])) if masks is not None and ids else None
            rows.append((f"{label} {name}: score {scores[i]:.4g}", images[i], item.map, mask))
    return rows


def plot_sensitivity(path: Path, sens: Mapping[str, object]) -> str:
    """Detection rate against defect size, one line per kind: solid at the strong contrast, dashed at
    the faint one; the 90% line marks 'caught'."""
    sizes = list(sens["sizes_px"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    contrasts = sorted(float(c) for c in next(iter(sens["rates"].values())))
    for k, (kind, by_contrast) in enumerate(sens["rates"].items()):
        for c in contrasts:
            ax.plot(sizes, by_contrast[str(c)], marker="o", color=f"C{k}", linestyle="-" if c == max(contrasts) else "--",
                    label=f"{kind} (contrast {c:g})")
    ax.axhline(0.9, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(v) for v in sizes])
    ax.set_xlabel("defect size (px of the camera's frame)")
    ax.set_ylabel("share caught at the threshold")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("What this model will catch (synthetic defects in held-out good images)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def extreme_indices(r: np.ndarray, count: int = GRID_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the `count` lowest and highest finite R-scores."""
    finite = np.flatnonzero(np.isfinite(r))
    order = finite[np.argsort(r[finite], kind="stable")]
    return order[:count], order[::-1][:count]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def sensitivity_lines(sens: Mapping[str, object]) -> list[str]:
    """The label-free sensitivity check in words: the warning first, if any, then the smallest defect
    of each kind caught at least 90% of the time."""
    lines = [str(sens["warning"])] if sens.get("warning") else []
    seen = set(sens.get("seen_in_training") or ())
    parts = [f"{kind} {f'{px} px' if px else 'none up to 32 px'}{' (seen in training)' if kind in seen else ''}"
             for kind, px in dict(sens.get("minimum_detectable_px") or {}).items()]
    lines.append(f"What it will catch, told without any defect image (synthetic defects in {sens.get('n_good')} held-out "
                 f"good images, strong contrast): smallest size caught 90% of the time: {'; '.join(parts)}.")
    return lines


def plain_summary(metrics: Mapping[str, object], checkpoint: Path, policy: str) -> list[str]:
    """What a QA engineer reads first: what the model learned from, how often it will cry wolf on good
    parts, how many of the given defects it catches (or, without defect images, which synthetic ones
    it would), and the next command to run."""
    lines = []
    sens = metrics.get("sensitivity")
    if isinstance(sens, Mapping) and sens.get("warning"):
        lines.append(str(sens["warning"]))  # the loud line goes first
    n, wall = metrics.get("train_images"), metrics.get("train_wall_s")
    if n is not None:
        lines.append(f"Trained on {n} good images for {metrics.get('steps', '?')} steps"
                     + (f" in {float(wall) / 60:.1f} minutes." if wall is not None else "."))
    far, held = metrics.get("holdout_far_checkpoint"), metrics.get("holdout_n")
    if far is not None and held:
        lines.append(f"Expected false alarms at the default threshold: about {1000 * float(far):.0f} per 1,000 good "
                     f"parts (measured on {held} good images the model never trained on; with so few, a rate "
                     f"below {1000 / held:.0f} per 1,000 cannot be told apart from zero).")
    caught = metrics.get("recall_checkpoint")
    if caught is not None:
        lines.append(f"Of the {metrics.get('n_anomaly')} defect images given, the default threshold catches "
                     f"{100 * float(caught):.0f}% (ranking quality, AUROC: {float(metrics.get('auroc_r', 0)):.3f}; "
                     "1.0 = every defect image above every good one, 0.5 = chance).")
    else:
        lines.append("No defect images were given, so how many defects it catches is unknown: add "
                     "--anomaly folder:DEFECTS to `train`, or run `ama-stream evaluate --anomaly folder:DEFECTS`.")
    if isinstance(sens, Mapping):
        lines += [line for line in sensitivity_lines(sens) if line != sens.get("warning")]
    lines.append(f"Next: set the alert threshold on good images it has not seen: ama-stream calibrate --checkpoint "
                 f"{checkpoint} --source heldout --policy {policy} --target-fpr 0.001 --out "
                 f"{checkpoint.parent / 'cal.json'}")
    return lines


def _sensitivity_html(sens: Mapping[str, object]) -> str:
    """The detection-rate table: a row per kind and contrast, a column per size."""
    sizes = list(sens["sizes_px"])
    seen = set(sens.get("seen_in_training") or ())
    head = "<tr><th>kind</th><th>contrast</th>" + "".join(f"<th>{v} px</th>" for v in sizes) + "</tr>"
    body = []
    for kind, by_contrast in sens["rates"].items():
        for contrast, rates in by_contrast.items():
            label = html.escape(kind) + (" (seen in training)" if kind in seen else "")
            body.append(f"<tr><td>{label}</td><td>{html.escape(str(contrast))}</td>"
                        + "".join(f"<td>{100 * float(r):.0f}%</td>" for r in rates) + "</tr>")
    return (f'<table id="sensitivity"><caption>Share of synthetic defects caught at the threshold; the same '
            f'{sens.get("n_good")} good images untouched: {100 * float(sens.get("false_alarms") or 0):.1f}% alert'
            f"</caption>{head}{''.join(body)}</table>")


def write_html(path: Path, title: str, metrics: Mapping[str, object], images: Sequence[str],
               notes: Sequence[str] = (), summary: Sequence[str] = ()) -> None:
    """report.html: a plain-language summary first (when given), then every figure, then the raw
    numbers; figures are referenced by relative file name."""
    rows = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in metrics.items()
                     if k != "sensitivity")
    sens = metrics.get("sensitivity")
    sens_html = _sensitivity_html(sens) if isinstance(sens, Mapping) else ""
    summary_html = ("<section id=\"summary\"><h2>Summary</h2>" + "".join(f"<p>{html.escape(line)}</p>" for line in summary)
                    + sens_html + "</section>") if summary or sens_html else ""
    figs = "\n".join(f'<figure><img src="{html.escape(name)}" alt="{html.escape(name)}">'
                     f"<figcaption>{html.escape(name)}</figcaption></figure>" for name in images)
    note_items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:13px}}figure{{display:inline-block;margin:1em}}
img{{max-width:100%}}</style></head>
<body data-images-broken="unknown"><h1>{html.escape(title)}</h1>
{summary_html}
<ul>{note_items}</ul>
{figs}
<h2>All numbers</h2>
<table>{rows}</table>
<script>/* says on the page whether every plot loaded (checked by tests in headless Chromium) */
window.addEventListener("load", function () {{
  var broken = Array.prototype.filter.call(document.images, function (im) {{ return !im.complete || im.naturalWidth === 0; }});
  document.body.setAttribute("data-images-broken", String(broken.length));
}});</script>
</body></html>
"""
    atomic_write_bytes(path, page.encode())


def write_report(out_dir: str | Path, scorer, *, title: str, metrics: Mapping[str, object],
                 normal_images: np.ndarray, r_normal: np.ndarray, anomaly_images: np.ndarray | None = None,
                 r_anomaly: np.ndarray | None = None, a_normal: np.ndarray | None = None,
                 a_anomaly: np.ndarray | None = None, metrics_csv: Path | None = None,
                 normal_label: str = "normal", notes: Sequence[str] = (), summary: Sequence[str] = (),
                 overlays: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]] | None = None) -> Path:
    """Every plot that the data allows, and report.html; returns the report's path.

    images are fitted to the model (Scorer.fit: uint8 [N, S, S, C], or a patch model's object array);
    r_* their scores; a_* their A-scores (-log A, high = anomalous) for the ROC/PR curves. A patch
    model's reconstruction rows show each image's highest-scoring patch.
    """
    from ama_stream.preprocess import to_tensor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    has_anomalies = anomaly_images is not None and r_anomaly is not None and len(r_anomaly) > 0
    score_label = scorer.checkpoint.score_label
    images = [plot_scores(out / "scores.png", r_normal, r_anomaly if has_anomalies else None, normal_label,
                          score_label)]
    if has_anomalies:
        labels = np.concatenate([np.zeros(len(r_normal), int), np.ones(len(r_anomaly), int)])
        curves = {score_label: np.concatenate([r_normal, r_anomaly])}
        if a_normal is not None and a_anomaly is not None:
            curves["A-score"] = np.concatenate([a_normal, a_anomaly])
        images += plot_roc_pr(out / "roc.png", out / "pr.png", labels, curves)
    if metrics_csv is not None and Path(metrics_csv).is_file():
        name = plot_losses(out / "losses.png", read_metrics_csv(Path(metrics_csv)))
        if name:
            images.append(name)
    grid_rows = []
    pools = [(normal_label, normal_images, r_normal)]
    if has_anomalies:
        pools.append(("anomaly", anomaly_images, r_anomaly))
    for label, pool, r in pools:
        low, high = extreme_indices(r)
        for which, idx in (("lowest R", low), ("highest R", high)):
            if len(idx):
                x = to_tensor(scorer.representative_inputs(pool[idx]))
                grid_rows.append((f"{label}: {which}", x.numpy(), scorer.reconstruct(x).numpy(), r[idx]))
    images.append(plot_reconstructions(out / "reconstructions.png", grid_rows))
    if isinstance(metrics.get("sensitivity"), Mapping):
        images.append(plot_sensitivity(out / "sensitivity.png", metrics["sensitivity"]))
    if overlays:
        images.append(plot_overlays(out / "maps.png", overlays))
    write_html(out / "report.html", title, metrics, images, notes, summary)
    return out / "report.html"
