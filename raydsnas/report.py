"""`python -m raydsnas.report URI [-o report.html]`: a run or a sweep as one self-contained HTML
page (inline SVG, no scripts, no external files).

A run (`<storage>/<name>`): the alpha heatmap over time (one row per layer and candidate, one
column per epoch), entropy and frozen-layer curves, loss and accuracy curves, the final
architecture. A sweep (`<storage>/<sweep>` with `summary.json`): validation top-1 vs FLOPs of
every trial with the Pareto front, each trial's validation curve, and the summary table.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow.fs as pafs

from raydsnas.data.storage import join_path, read_bytes, resolve_filesystem, storage_errors

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
W, H, PAD = 560, 300, 48


# -- reading ---------------------------------------------------------------------------------------
def run_history(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """The per-epoch history of a run, from its latest registered checkpoint."""
    from raydsnas.train.checkpoint import SNAPSHOT_FILE, read_latest_state, read_snapshot

    fs, root = resolve_filesystem(uri, storage_options)
    with storage_errors(uri, storage_options):
        if read_snapshot(fs, root) is None:
            raise FileNotFoundError(f"{uri} is neither a run (no {SNAPSHOT_FILE}) nor a sweep "
                                    "(no summary.json)")
        state = read_latest_state(fs, root, where=uri)
    return json.loads(state["history"])


def read_summary(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict | None:
    fs, root = resolve_filesystem(uri, storage_options)
    path = join_path(root, "summary.json")
    with storage_errors(uri, storage_options):
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        return json.loads(read_bytes(fs, path))


# -- SVG -------------------------------------------------------------------------------------------
def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _axes(title: str, xlabel: str, ylabel: str, xr: tuple, yr: tuple) -> list[str]:
    parts = [f'<rect x="{PAD}" y="{PAD / 2}" width="{W - 1.5 * PAD}" height="{H - 1.5 * PAD}" '
             'fill="none" stroke="#999"/>',
             f'<text x="{W / 2}" y="16" text-anchor="middle" font-weight="bold">'
             f'{html.escape(title)}</text>',
             f'<text x="{W / 2}" y="{H - 6}" text-anchor="middle">{html.escape(xlabel)}</text>',
             f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" '
             f'text-anchor="middle">{html.escape(ylabel)}</text>']
    for value, anchor, x, y in ((xr[0], "start", PAD, H - PAD + 14), (xr[1], "end", W - PAD / 2, H - PAD + 14),
                                (yr[0], "end", PAD - 4, H - PAD), (yr[1], "end", PAD - 4, PAD / 2 + 10)):
        parts.append(f'<text x="{x}" y="{y}" text-anchor="{anchor}" font-size="11">{value:.4g}</text>')
    return parts


def _svg(plot_id: str, parts: list[str]) -> str:
    return (f'<svg id="{plot_id}" class="plot" xmlns="http://www.w3.org/2000/svg" width="{W}" '
            f'height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">'
            + "".join(parts) + "</svg>")


def line_chart(plot_id: str, title: str, series: Mapping[str, Sequence[tuple[float, float]]],
               xlabel: str, ylabel: str, marker: tuple[float, str] | None = None,
               log_y: bool = False) -> str:
    """One polyline per series; `marker` = (x, label) draws a dashed vertical line there (e.g.
    where the search ended); `log_y` plots log10 of positive values."""
    if log_y:
        series = {name: [(x, math.log10(y)) for x, y in pts if y is not None and y > 0]
                  for name, pts in series.items()}
        ylabel = f"log10 {ylabel}"
    points = [p for s in series.values() for p in s]
    if not points:
        return _svg(plot_id, _axes(title + " (no data)", xlabel, ylabel, (0, 1), (0, 1)))
    xr = (min(p[0] for p in points), max(p[0] for p in points))
    yr = (min(p[1] for p in points), max(p[1] for p in points))
    sx, sy = _scale(*xr, PAD, W - PAD / 2), _scale(*yr, H - PAD, PAD / 2)
    parts = _axes(title, xlabel, ylabel, xr, yr)
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="series" points="{path}" fill="none" stroke="{color}" '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{W - PAD / 2 - 4}" y="{PAD / 2 + 14 * (i + 1)}" text-anchor="end" '
                     f'fill="{color}">{html.escape(name)}</text>')
    if marker is not None and xr[0] <= marker[0] <= xr[1]:
        x = sx(marker[0])
        parts.append(f'<line class="marker" x1="{x:.1f}" y1="{PAD / 2}" x2="{x:.1f}" '
                     f'y2="{H - PAD}" stroke="#555" stroke-dasharray="4 3"/>'
                     f'<text x="{x + 3:.1f}" y="{PAD / 2 + 12}" font-size="10" fill="#555">'
                     f'{html.escape(marker[1])}</text>')
    return _svg(plot_id, parts)


def scatter_with_front(plot_id: str, title: str, points: Sequence[tuple[str, float, float]],
                       front: Sequence[str], best: str | None) -> str:
    """(name, flops, accuracy) points; the Pareto front drawn as a step line."""
    if not points:
        return _svg(plot_id, _axes(title + " (no completed trials)", "MFLOPs", "top-1", (0, 1), (0, 1)))
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    pad_x = (max(xs) - min(xs)) * 0.05 or 0.05
    pad_y = (max(ys) - min(ys)) * 0.05 or 0.01
    xr, yr = (min(xs) - pad_x, max(xs) + pad_x), (min(ys) - pad_y, max(ys) + pad_y)
    sx, sy = _scale(*xr, PAD, W - PAD / 2), _scale(*yr, H - PAD, PAD / 2)
    parts = _axes(title, "MFLOPs", "validation top-1", xr, yr)
    by_name = {p[0]: p for p in points}
    line = [by_name[n] for n in front if n in by_name]
    if line:
        path = " ".join(f"{sx(p[1]):.1f},{sy(p[2]):.1f}" for p in line)
        parts.append(f'<polyline class="pareto" points="{path}" fill="none" stroke="#d62728" '
                     'stroke-dasharray="4 3" stroke-width="2"/>')
    for name, x, y in points:
        fill = "#d62728" if name in front else "#1f77b4"
        parts.append(f'<circle class="trial" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{fill}">'
                     f'<title>{html.escape(name)}: {y:.4f} top-1, {x:.3f} MFLOPs</title></circle>')
        if name == best:
            parts.append(f'<text x="{sx(x) + 7:.1f}" y="{sy(y) - 7:.1f}">best</text>')
    return _svg(plot_id, parts)


def heatmap(plot_id: str, title: str, rows: Sequence[str], columns: Sequence[Any],
            values: Sequence[Sequence[float]]) -> str:
    """values[row][column] in [0, 1], darker = higher."""
    n_rows, n_cols = len(rows), max(1, len(columns))
    height = max(H, 14 + 10 * n_rows + PAD)
    cw, ch = (W - PAD - 10) / n_cols, (height - PAD - 24) / max(1, n_rows)
    parts = [f'<text x="{W / 2}" y="16" text-anchor="middle" font-weight="bold">'
             f'{html.escape(title)}</text>']
    for r, label in enumerate(rows):
        y = 24 + r * ch
        if n_rows <= 40 or r % 4 == 0:
            parts.append(f'<text x="{PAD - 4}" y="{y + ch * 0.8:.1f}" text-anchor="end" '
                         f'font-size="8">{html.escape(label)}</text>')
        for c in range(len(columns)):
            v = max(0.0, min(1.0, float(values[r][c])))
            shade = int(255 * (1 - v))
            parts.append(f'<rect x="{PAD + c * cw:.1f}" y="{y:.1f}" width="{cw + 0.3:.1f}" '
                         f'height="{ch + 0.3:.1f}" fill="rgb({shade},{shade},255)"/>')
    parts.append(f'<text x="{W / 2}" y="{height - 8}" text-anchor="middle">epoch 1..'
                 f'{len(columns)}</text>')
    return (f'<svg id="{plot_id}" class="plot" xmlns="http://www.w3.org/2000/svg" width="{W}" '
            f'height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" '
            'font-size="12">' + "".join(parts) + "</svg>")


# -- pages -----------------------------------------------------------------------------------------
def search_end(history: list[dict]) -> tuple[float, str] | None:
    """(epoch, label) of the epoch in which the search ended (every layer frozen), if it did."""
    ended = next((h for h in history if h.get("search_end_epoch") is not None), None)
    if ended is None:
        return None
    return float(ended["search_end_epoch"]), "search ended"


def run_section(name: str, history: list[dict], choices: Sequence[str] | None = None) -> str:
    epochs = [h["epoch"] for h in history]
    probs = [h["probs"] for h in history if "probs" in h]
    parts = [f"<h2>Run {html.escape(name)}</h2>"]
    marker = search_end(history)
    ended = next((h for h in history if h.get("search_end_epoch") is not None), None)
    if ended is not None:
        forced = ended.get("forced_frozen", 0)
        parts.append(f'<p id="search-end">The search ended in epoch {ended["search_end_epoch"]} '
                     f'(step {ended["search_end_step"]}): {len(ended["probs"]) - forced} '
                     f'layer(s) frozen by h, {forced} by the freeze_by deadline; after it the '
                     'run trains the child alone.</p>')
    elif history and "probs" in history[-1]:
        parts.append('<p id="search-end">The search did not end: some layers were still '
                     'searched at the last epoch (their weights stayed shared).</p>')
    if probs:
        layers, n = len(probs[0]), len(probs[0][0])
        names = choices or [f"c{k}" for k in range(n)]
        rows = [f"L{l} {names[k]}" for l in range(layers) for k in range(n)]
        values = [[p[l][k] for p in probs] for l in range(layers) for k in range(n)]
        parts.append(heatmap(f"alpha-heatmap-{name}", "architecture probabilities over time",
                             rows, epochs[-len(probs):], values))
    parts.append(line_chart(f"entropy-{name}", "mean entropy of the architecture distribution",
                            {"entropy": [(h["epoch"], h["entropy"]) for h in history]},
                            "epoch", "nats", marker))
    parts.append(line_chart(f"frozen-{name}", "frozen layers",
                            {"frozen": [(h["epoch"], h["frozen"]) for h in history]},
                            "epoch", "layers", marker))
    credit = [h for h in history if h.get("credit")]
    if credit:
        layers = len(credit[0]["credit"])
        parts.append(line_chart(
            f"credit-{name}", "credit |dL/d(one_l)| per layer (running mean while searched)",
            {f"L{l}": [(h["epoch"], h["credit"][l]) for h in credit] for l in range(layers)},
            "epoch", "|credit|", marker, log_y=True))
        parts.append(credit_table(credit[-1]["credit"]))
    parts.append(line_chart(f"accuracy-{name}", "accuracy", {
        "train top-1": [(h["epoch"], h["train_top1"]) for h in history],
        "val top-1 (argmax)": [(h["epoch"], h["val_top1"]) for h in history if "val_top1" in h]},
        "epoch", "top-1", marker))
    parts.append(line_chart(f"loss-{name}", "training loss",
                            {"loss": [(h["epoch"], h["train_loss"]) for h in history]},
                            "epoch", "loss", marker))
    if history:
        parts.append(f"<p>final argmax architecture: <code>{html.escape(str(history[-1].get('arch')))}"
                     f"</code>, expected FLOPs {history[-1]['expected_flops'] / 1e6:.3f}M</p>")
    return "\n".join(parts)


def credit_table(credit: Sequence[float | None]) -> str:
    """Per layer: its credit and its ratio to the median layer's. A layer far below the
    median (< 1e-2 of it) is barely steered by the loss: its choice moves on noise."""
    known = sorted(v for v in credit if v)
    median = known[len(known) // 2] if known else None
    cells = []
    for l, v in enumerate(credit):
        ratio = v / median if v and median else None
        weak = ratio is not None and ratio < 1e-2
        cells.append(f"<tr{' class=weak' if weak else ''}><td>L{l}</td>"
                     f"<td>{'' if v is None else f'{v:.3g}'}</td>"
                     f"<td>{'' if ratio is None else f'{ratio:.3g}'}</td>"
                     f"<td>{'barely steered' if weak else ''}</td></tr>")
    return ('<table id="credit"><tr><th>layer</th><th>credit</th><th>/ median</th><th></th>'
            f'</tr>{"".join(cells)}</table>')


def sweep_section(summary: dict, histories: Mapping[str, list[dict]]) -> str:
    done = [r for r in summary["trials"] if r["status"] == "completed"]
    points = [(r["trial"], r["flops"] / 1e6, r["top1"]) for r in done]
    parts = [f"<h2>Sweep {html.escape(summary['sweep'])}</h2>",
             scatter_with_front("pareto", "deployable child: top-1 vs FLOPs (red: Pareto front)",
                                points, summary["pareto_front"], summary["best_trial"]),
             line_chart("trial-curves", "validation top-1 (argmax) per trial", {
                 name: [(h["epoch"], h["val_top1"]) for h in hist if "val_top1" in h]
                 for name, hist in histories.items()}, "epoch", "top-1")]
    keys = list(summary["params"])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in
                   ["trial", "status", *keys, "top-1", "MFLOPs", "params (M)", "wall s"])
    body = []
    for r in summary["trials"]:
        ok = r["status"] == "completed"
        cells = [r["trial"] + (" (best)" if r["trial"] == summary["best_trial"] else ""),
                 r["status"], *[r["params"].get(k) for k in keys],
                 f"{r['top1']:.4f}" if ok else "", f"{r['flops'] / 1e6:.3f}" if ok else "",
                 f"{r['params_count'] / 1e6:.3f}" if ok else "", f"{r['wall_time_s']:.0f}" if ok else ""]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    parts.append(f'<table id="summary"><tr>{head}</tr>{"".join(body)}</table>')
    return "\n".join(parts)


def render(uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    summary = read_summary(uri, storage_options)
    if summary is not None:
        histories = {}
        for row in summary["trials"]:
            try:
                histories[row["trial"]] = run_history(f"{summary['uri']}/{row['trial']}",
                                                      storage_options)
            except (FileNotFoundError, KeyError, OSError):
                histories[row["trial"]] = []
        body = sweep_section(summary, histories) + "".join(
            run_section(name, hist) for name, hist in histories.items() if hist)
        title = f"raydsnas sweep {summary['sweep']}"
    else:
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        body, title = run_section(name, run_history(uri, storage_options)), f"raydsnas run {name}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:24px;max-width:1200px}"
            "svg{margin:8px;border:1px solid #eee}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{body}</body></html>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raydsnas.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri", help="a run (<storage>/<name>) or a sweep (<storage>/<sweep>)")
    parser.add_argument("-o", "--output", default="report.html", help="the HTML file to write")
    args = parser.parse_args(argv)
    try:
        page = render(args.uri)
    except (FileNotFoundError, OSError) as err:
        print(f"raydsnas: cannot report on {args.uri}: {err}", file=sys.stderr)
        return 2
    with open(args.output, "w") as f:
        f.write(page)
    print(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
