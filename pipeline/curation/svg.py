"""Hand-written SVG charts for the HTML report: no plotting dependency, nothing fetched at view time.

Each chart is a standalone <svg> string. Marks carry their numbers as data-* attributes and <title>
tooltips, so the chart can be read by a person and checked by a test from the DOM alone.
"""

from __future__ import annotations

import html

import numpy as np

PALETTE = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
    "#1f77b4",
    "#2ca02c",
]
FONT = 'font-family="DejaVu Sans, Arial, sans-serif"'


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    ax = abs(x)
    if ax != 0 and (ax < 1e-3 or ax >= 1e5):
        return f"{x:.2e}"
    return f"{x:.3g}" if ax < 10 else f"{x:.1f}"


def _attrs(attrs: dict | None) -> str:
    return "".join(f' {k}="{esc(v)}"' for k, v in (attrs or {}).items())


def _open(width: int, height: int, attrs: dict | None, title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img"{_attrs(attrs)}>',
        f"<title>{esc(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-size="13" font-weight="bold" {FONT}>'
        f"{esc(title)}</text>",
    ]


def _axis_label(x: float, y: float, text: str, cls: str, rotate: bool = False) -> str:
    transform = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
    return (
        f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}" text-anchor="middle" font-size="11" {FONT}{transform}>'
        f"{esc(text)}</text>"
    )


def histogram(
    values,
    *,
    title: str,
    x_label: str,
    y_label: str = "count",
    bins: int = 20,
    value_range: tuple[float, float] | None = None,
    color: str = PALETTE[0],
    attrs: dict | None = None,
    width: int = 360,
    height: int = 220,
) -> str:
    """Histogram of finite values; each bar carries data-count, data-lo, data-hi."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    lo, hi = value_range if value_range else ((float(v.min()), float(v.max())) if len(v) else (0.0, 1.0))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    left, right, top, bottom = 48, 12, 26, 40
    pw, ph = width - left - right, height - top - bottom
    peak = max(int(counts.max()) if len(counts) else 0, 1)
    out = _open(width, height, {"class": "chart histogram", "data-count": len(v), **(attrs or {})}, title)
    bw = pw / bins
    for i, c in enumerate(counts):
        h = ph * c / peak
        out.append(
            f'<rect class="bar" x="{left + i * bw:.2f}" y="{top + ph - h:.2f}" width="{max(bw - 1, 0.5):.2f}" '
            f'height="{h:.2f}" fill="{color}" data-count="{int(c)}" data-lo="{edges[i]:.6g}" '
            f'data-hi="{edges[i + 1]:.6g}"><title>{fmt(edges[i])} to {fmt(edges[i + 1])}: {int(c)}</title></rect>'
        )
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333"/>')
    for frac in (0.0, 0.5, 1.0):
        x = left + pw * frac
        out.append(
            f'<text class="tick" x="{x:.1f}" y="{top + ph + 13}" text-anchor="middle" font-size="10" {FONT}>'
            f"{fmt(lo + (hi - lo) * frac)}</text>"
        )
    out.append(f'<text class="tick" x="{left - 4}" y="{top + 8}" text-anchor="end" font-size="10" {FONT}>{peak}</text>')
    out.append(f'<text class="tick" x="{left - 4}" y="{top + ph}" text-anchor="end" font-size="10" {FONT}>0</text>')
    out.append(_axis_label(left + pw / 2, height - 6, x_label, "x-label"))
    out.append(_axis_label(12, top + ph / 2, y_label, "y-label", rotate=True))
    out.append("</svg>")
    return "\n".join(out)


def box_rows(
    groups: dict[str, np.ndarray],
    *,
    title: str,
    x_label: str,
    attrs: dict | None = None,
    width: int = 520,
    row_height: int = 26,
) -> str:
    """One horizontal box plot (min, quartiles, max) per named group, on a shared axis."""
    clean = {
        k: np.asarray(v, dtype=np.float64)[np.isfinite(np.asarray(v, dtype=np.float64))] for k, v in groups.items()
    }
    clean = {k: v for k, v in clean.items() if len(v)}
    allv = np.concatenate(list(clean.values())) if clean else np.array([0.0, 1.0])
    lo, hi = float(allv.min()), float(allv.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    left, right, top = 110, 16, 28
    height = top + row_height * max(len(clean), 1) + 40
    pw = width - left - right

    def x(val: float) -> float:
        return left + pw * (val - lo) / (hi - lo)

    out = _open(width, height, {"class": "chart boxes", **(attrs or {})}, title)
    for i, (name, v) in enumerate(clean.items()):
        q0, q1, q2, q3, q4 = np.quantile(v, [0, 0.25, 0.5, 0.75, 1])
        cy = top + row_height * i + row_height / 2
        color = PALETTE[i % len(PALETTE)]
        out.append(
            f'<g class="box" data-group="{esc(name)}" data-count="{len(v)}" data-median="{q2:.6g}">'
            f"<title>{esc(name)}: n={len(v)}, median {fmt(q2)}, IQR {fmt(q1)} to {fmt(q3)}</title>"
            f'<text x="{left - 6}" y="{cy + 4:.1f}" text-anchor="end" font-size="11" {FONT}>{esc(name)}</text>'
            f'<line x1="{x(q0):.2f}" y1="{cy:.1f}" x2="{x(q4):.2f}" y2="{cy:.1f}" stroke="#555"/>'
            f'<rect x="{x(q1):.2f}" y="{cy - 8:.1f}" width="{max(x(q3) - x(q1), 1):.2f}" height="16" '
            f'fill="{color}" fill-opacity="0.7" stroke="#333"/>'
            f'<line x1="{x(q2):.2f}" y1="{cy - 8:.1f}" x2="{x(q2):.2f}" y2="{cy + 8:.1f}" stroke="#000" '
            f'stroke-width="2"/></g>'
        )
    axis_y = top + row_height * max(len(clean), 1) + 4
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + pw}" y2="{axis_y}" stroke="#333"/>')
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(
            f'<text class="tick" x="{left + pw * frac:.1f}" y="{axis_y + 13}" text-anchor="middle" '
            f'font-size="10" {FONT}>{fmt(lo + (hi - lo) * frac)}</text>'
        )
    out.append(_axis_label(left + pw / 2, height - 6, x_label, "x-label"))
    out.append("</svg>")
    return "\n".join(out)


def stacked_bars(
    rows: dict[str, list[float]],
    segment_names: list[str],
    *,
    title: str,
    x_label: str,
    attrs: dict | None = None,
    width: int = 640,
    row_height: int = 26,
) -> str:
    """One horizontal bar per row, split into segments (e.g. mean gate weight per objective)."""
    left, right, top = 110, 16, 28
    legend_h = 18 * ((len(segment_names) + 2) // 3)
    height = top + row_height * max(len(rows), 1) + 36 + legend_h
    pw = width - left - right
    total_max = max([sum(v) for v in rows.values()] + [1e-12])
    out = _open(width, height, {"class": "chart stacked", **(attrs or {})}, title)
    for i, (name, values) in enumerate(rows.items()):
        y = top + row_height * i + 4
        out.append(f'<g class="stack" data-group="{esc(name)}">')
        out.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end" font-size="11" {FONT}>{esc(name)}</text>')
        x0 = float(left)
        for j, (seg, val) in enumerate(zip(segment_names, values)):
            w = pw * val / total_max
            out.append(
                f'<rect class="segment" x="{x0:.2f}" y="{y}" width="{w:.2f}" height="{row_height - 8}" '
                f'fill="{PALETTE[j % len(PALETTE)]}" data-segment="{esc(seg)}" data-value="{val:.6g}">'
                f"<title>{esc(name)} / {esc(seg)}: {fmt(val)}</title></rect>"
            )
            x0 += w
        out.append("</g>")
    axis_y = top + row_height * max(len(rows), 1) + 4
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + pw}" y2="{axis_y}" stroke="#333"/>')
    for frac in (0.0, 0.5, 1.0):
        out.append(
            f'<text class="tick" x="{left + pw * frac:.1f}" y="{axis_y + 13}" text-anchor="middle" '
            f'font-size="10" {FONT}>{fmt(total_max * frac)}</text>'
        )
    out.append(_axis_label(left + pw / 2, axis_y + 28, x_label, "x-label"))
    for j, seg in enumerate(segment_names):
        lx, ly = left + (j % 3) * (pw / 3), axis_y + 40 + 18 * (j // 3)
        out.append(
            f'<rect x="{lx:.1f}" y="{ly}" width="10" height="10" fill="{PALETTE[j % len(PALETTE)]}"/>'
            f'<text class="legend" x="{lx + 14:.1f}" y="{ly + 9}" font-size="10" {FONT}>{esc(seg)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def _diverging(r: float) -> str:
    """-1 blue, 0 white, +1 red."""
    if not np.isfinite(r):
        return "#dddddd"
    r = max(-1.0, min(1.0, r))
    a, b = (np.array([255, 255, 255]), np.array([214, 39, 40]) if r > 0 else np.array([31, 119, 180]))
    c = a + (b - a) * abs(r)
    return "#" + "".join(f"{int(round(x)):02x}" for x in c)


def heatmap(matrix: np.ndarray, labels: list[str], *, title: str, attrs: dict | None = None, cell: int = 56) -> str:
    """Square matrix of values in [-1, 1] (correlations), each cell labelled with its value."""
    n = len(labels)
    left, top = 190, 30
    width, height = left + cell * n + 20, top + cell * n + 12 + 7 * max((len(label) for label in labels), default=0)
    out = _open(width, height, {"class": "chart heatmap", **(attrs or {})}, title)
    for i in range(n):
        out.append(
            f'<text class="row-label" x="{left - 6}" y="{top + cell * i + cell / 2 + 4:.1f}" text-anchor="end" '
            f'font-size="10" {FONT}>{esc(labels[i])}</text>'
        )
        cx = left + cell * i + cell / 2
        cy = top + cell * n + 6
        out.append(
            f'<text class="col-label" x="{cx:.1f}" y="{cy:.1f}" text-anchor="end" font-size="10" {FONT} '
            f'transform="rotate(-50 {cx:.1f} {cy:.1f})">{esc(labels[i])}</text>'
        )
        for j in range(n):
            r = float(matrix[i, j])
            out.append(
                f'<rect class="cell" x="{left + cell * j}" y="{top + cell * i}" width="{cell - 1}" '
                f'height="{cell - 1}" fill="{_diverging(r)}" data-row="{esc(labels[i])}" '
                f'data-col="{esc(labels[j])}" data-value="{r:.6g}"><title>{esc(labels[i])} vs '
                f"{esc(labels[j])}: {fmt(r)}</title></rect>"
            )
            out.append(
                f'<text x="{left + cell * j + cell / 2:.1f}" y="{top + cell * i + cell / 2 + 4:.1f}" '
                f'text-anchor="middle" font-size="11" {FONT}>{fmt(r) if np.isfinite(r) else "n/a"}</text>'
            )
    out.append("</svg>")
    return "\n".join(out)


def bars(
    values: dict[str, float],
    *,
    title: str,
    x_label: str,
    attrs: dict | None = None,
    width: int = 560,
    row_height: int = 24,
    color: str = PALETTE[2],
    value_format=fmt,
) -> str:
    """Horizontal bars, one per label (e.g. rows removed per threshold)."""
    left, right, top = 230, 60, 28
    height = top + row_height * max(len(values), 1) + 40
    pw = width - left - right
    peak = max(list(values.values()) + [1e-12])
    out = _open(width, height, {"class": "chart bars", **(attrs or {})}, title)
    for i, (label, val) in enumerate(values.items()):
        y = top + row_height * i + 3
        w = pw * val / peak if peak > 0 else 0
        out.append(
            f'<g class="bar-row" data-label="{esc(label)}" data-value="{val:.6g}">'
            f'<text x="{left - 6}" y="{y + 12}" text-anchor="end" font-size="11" {FONT}>{esc(label)}</text>'
            f'<rect class="bar" x="{left}" y="{y}" width="{max(w, 0):.2f}" height="{row_height - 6}" '
            f'fill="{color}"><title>{esc(label)}: {value_format(val)}</title></rect>'
            f'<text x="{left + max(w, 0) + 4:.1f}" y="{y + 12}" font-size="10" {FONT}>{value_format(val)}</text>'
            f"</g>"
        )
    axis_y = top + row_height * max(len(values), 1) + 2
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + pw}" y2="{axis_y}" stroke="#333"/>')
    out.append(_axis_label(left + pw / 2, axis_y + 26, x_label, "x-label"))
    out.append("</svg>")
    return "\n".join(out)


def lines(
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    attrs: dict | None = None,
    width: int = 420,
    height: int = 260,
) -> str:
    """Line chart: one polyline per series of (x, y) points, each point a circle carrying its numbers
    (data-series, data-x, data-y), with a legend."""
    left, right, top, bottom = 52, 16, 28, 62
    pw, ph = width - left - right, height - top - bottom
    (x0, x1), (y0, y1) = x_range, y_range

    def px(x: float) -> float:
        return left + pw * (x - x0) / ((x1 - x0) or 1.0)

    def py(y: float) -> float:
        return top + ph * (1.0 - (y - y0) / ((y1 - y0) or 1.0))

    out = _open(width, height, {"class": "chart lines", **(attrs or {})}, title)
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333"/>')
    for v in (y0, (y0 + y1) / 2, y1):
        out.append(
            f'<text x="{left - 4}" y="{py(v) + 4:.1f}" text-anchor="end" font-size="10" {FONT}>{esc(fmt(v))}</text>'
        )
    for v in (x0, (x0 + x1) / 2, x1):
        out.append(
            f'<text x="{px(v):.1f}" y="{top + ph + 14}" text-anchor="middle" font-size="10" {FONT}>{esc(fmt(v))}</text>'
        )
    for i, (name, points) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = [(x, y) for x, y in points if y is not None and np.isfinite(y)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<g class="series" data-series="{esc(name)}">')
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for x, y in pts:
            out.append(
                f'<circle class="point" data-series="{esc(name)}" data-x="{x:.6g}" data-y="{y:.6g}" '
                f'cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"><title>{esc(name)}: {esc(fmt(x))}, '
                f"{esc(fmt(y))}</title></circle>"
            )
        out.append("</g>")
        ly = top + ph + 30 + 12 * i
        out.append(f'<rect x="{left}" y="{ly - 8}" width="10" height="8" fill="{color}"/>')
        out.append(f'<text x="{left + 14}" y="{ly}" font-size="10" {FONT}>{esc(name)}</text>')
    out.append(_axis_label(left + pw / 2, height - 4, x_label, "x-label"))
    out.append(_axis_label(12, top + ph / 2, y_label, "y-label", rotate=True))
    out.append("</svg>")
    return "\n".join(out)
