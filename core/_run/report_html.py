"""A run's report as one self-contained HTML page (``quanta._run.report_html``).

The page holds the recipe (as YAML), a chart with one row per quantized layer: a bar of its
relative error ‖W−Ŵ‖/‖W‖ and a bar of its size against its fp16 size, drawn as inline SVG
(``<rect class="bar error">`` and ``<rect class="bar size">``, one each per layer), a table
of the same figures, the skipped layers and the totals. No scripts, no external files: it
opens anywhere, offline. Written with :func:`quanta._files.atomic.atomic_file`.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from quanta._run.report import Report

__all__ = ["report_html", "write_report_html", "is_quanta_report", "GENERATOR"]

#: The ``<meta name="generator">`` value that marks a page quanta wrote.
GENERATOR = "quanta report"

_ROW, _LABEL_W, _BAR_W = 22, 260, 300


def _recipe_text(recipe: Any) -> str:
    if recipe is None:
        return "(not given)"
    import yaml

    from quanta._recipes.recipe import recipe_to_dict

    try:
        return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
    except Exception:  # a recipe holding objects YAML cannot write: show its repr instead
        return repr(recipe)


def _chart(report: Report) -> str:
    layers = report.layers
    max_err = max((r.rel_error for r in layers), default=0.0) or 1.0
    height = _ROW * len(layers) + 40
    width = _LABEL_W + 2 * _BAR_W + 60
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="per-layer error and size">',
             f'<text x="{_LABEL_W}" y="14" class="head">relative error (max {max_err:.3%})</text>',
             f'<text x="{_LABEL_W + _BAR_W + 30}" y="14" class="head">size / fp16 size</text>']
    for i, r in enumerate(layers):
        y = 24 + i * _ROW
        err_w = max(1.0, _BAR_W * r.rel_error / max_err)
        ratio = r.bytes / r.float_bytes if r.float_bytes else 0.0
        size_w = max(1.0, _BAR_W * min(ratio, 1.0))
        name = html.escape(r.name if len(r.name) <= 40 else "…" + r.name[-39:])
        parts.append(f'<text x="{_LABEL_W - 6}" y="{y + 13}" text-anchor="end">{name}</text>')
        parts.append(f'<rect class="bar error" x="{_LABEL_W}" y="{y}" width="{err_w:.1f}" height="{_ROW - 6}">'
                     f'<title>{html.escape(r.name)}: error {r.rel_error:.4%}</title></rect>')
        parts.append(f'<rect class="bar size" x="{_LABEL_W + _BAR_W + 30}" y="{y}" width="{size_w:.1f}" '
                     f'height="{_ROW - 6}"><title>{html.escape(r.name)}: {r.bytes} of {r.float_bytes} bytes '
                     f'({ratio:.1%})</title></rect>')
    parts.append("</svg>")
    return "\n".join(parts)


def report_html(report: Report, recipe: Any = None, title: str | None = None) -> str:
    """The page for ``report`` (and the ``recipe`` that produced it) as a string."""
    esc = html.escape
    title = title or f"quanta report: {report.algorithm}"
    rows = "\n".join(
        f"<tr><td>{esc(r.name)}</td><td>{esc(r.module_type)}</td><td>{esc('x'.join(map(str, r.shape)))}</td>"
        f"<td>{esc(r.spec)}</td><td>{r.rel_error:.4%}</td><td>{r.bytes / 1024:.1f}</td>"
        f"<td>{r.float_bytes / 1024:.1f}</td><td>{esc(r.reason)}</td></tr>" for r in report.layers)
    skipped = "".join(f"<li>{esc(n)}: {esc(why)}</li>" for n, why in report.skipped) or "<li>none</li>"
    ratio = report.float_bytes / report.bytes if report.bytes else 0.0
    totals = (f"{len(report.layers)} layers quantized with {esc(report.algorithm)!s} in {report.seconds:.2f} s: "
              f"{report.float_bytes / 2**20:.2f} MiB fp16 → {report.bytes / 2**20:.2f} MiB ({ratio:.2f}x smaller)")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{GENERATOR}">
<title>{esc(title)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; }}
pre {{ background: #f6f6f6; padding: 1em; }} svg text {{ font: 12px system-ui, sans-serif; }}
svg .head {{ font-weight: bold; }} .bar.error {{ fill: #c0504d; }} .bar.size {{ fill: #4f81bd; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p class="totals">{totals}</p>
<h2>Per layer</h2>
{_chart(report)}
<table><thead><tr><th>layer</th><th>type</th><th>shape</th><th>spec</th><th>rel. error</th><th>KiB</th>
<th>fp16 KiB</th><th>why</th></tr></thead><tbody>
{rows}
</tbody></table>
<h2>Skipped (left float)</h2><ul>{skipped}</ul>
<h2>Recipe</h2><pre>{esc(_recipe_text(recipe))}</pre>
</body></html>
"""


def is_quanta_report(path: Path) -> bool:
    """True when ``path`` is a page :func:`write_report_html` wrote (its generator meta tag)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(512)
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}">' in head


def write_report_html(report: Report, path: str | os.PathLike, recipe: Any = None, *, overwrite: bool = False) -> Path:
    """Write :func:`report_html` to ``path`` atomically; quanta's own earlier report is replaced,
    another existing file needs ``overwrite=True``. Returns the path."""
    from quanta._files.atomic import atomic_file

    text = report_html(report, recipe)
    with atomic_file(path, overwrite=overwrite, owned=is_quanta_report) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
