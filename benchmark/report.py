"""``python -m benchmark.report``: one self-contained HTML page per exported sweep.

``<out>/<sweep>/report.html`` holds the sweep's tables (results.md: per cell with bootstrap
intervals, and mean ± std [95% t-interval] over seeds, each with the real-vs-real floors), the
ranking of the priors beside the paper's Table 1 (Welch's test between neighbours, Spearman's rho
with a seed-bootstrap interval), the convergence over EMA snapshots where the sweep has them
(convergence.md), the latent statistics over tokenizer training and the teachers' held-out loss
where their runs recorded them (latent_curves.md, teacher_curves.md), every figure that
``benchmark.figures`` drew (embedded as base64 PNG, so the file can be mailed or attached on its
own), the figures that were skipped and why, and per cell relative links to its stage logs and
resolved config in the exported folder. ``python -m benchmark.figures`` calls this at its end;
run it alone to rebuild the pages from figures already drawn.
"""
from __future__ import annotations

import argparse
import base64
import html
import logging
import os
import re
from pathlib import Path

import pandas as pd

from benchmark.store import read_json, write_text

log = logging.getLogger("benchmark.report")

STAGE_ORDER = ["fid_ref", "ssl_backbone", "reference", "teacher", "tokenizer", "recon_eval", "latent_cache", "generator",
               "gen_eval"]
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; } .skip { color: #8a5a00; } code { background: #f6f6f6; }
"""


def _inline(text: str) -> str:
    """Escape, then `code` spans: the only inline markup aggregate.markdown writes."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def md_to_html(md: str) -> str:
    """The Markdown subset our tables use: headings, pipe tables and paragraphs."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 6)  # the page's <h1> is the sweep's name
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith(("#", "|")):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def _png_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _figures_html(fig_dir: Path, heading: str) -> str:
    if not (fig_dir / "manifest.json").exists():
        return f"<h2>{heading}</h2><p class='skip'>No figures in {html.escape(str(fig_dir))}: run " \
               "<code>python -m benchmark.figures</code>.</p>"
    man = read_json(fig_dir / "manifest.json")
    parts = [f"<h2>{heading}</h2>"]
    for f in man["figures"]:
        png = fig_dir / f"{f['name']}.png"
        if not png.exists():
            parts.append(f"<p class='skip'>{html.escape(f['title'])}: {png.name} is missing.</p>")
            continue
        parts.append(f"<figure id='{html.escape(f['name'])}'><h3>{html.escape(f['title'])}</h3>"
                     f"{_png_tag(png, f['title'])}<figcaption>{html.escape(f['caption'])}"
                     f" (PDF: <code>{html.escape(f['name'])}.pdf</code>)</figcaption></figure>")
    for s in man.get("skipped", []):
        parts.append(f"<p class='skip'><b>{html.escape(s['title'])}</b> not drawn: {html.escape(s['reason'])}.</p>")
    return "\n".join(parts)


def _ranking_html(fig_dir: Path) -> str:
    if not (fig_dir / "ranking.md").exists():
        return "<h2>Ranking of the priors</h2><p class='skip'>No ranking yet: run <code>python -m benchmark.figures</code>.</p>"
    return md_to_html((fig_dir / "ranking.md").read_text())


def _convergence_html(fig_dir: Path) -> str:
    """convergence.md where benchmark.figures wrote one (sweeps with EMA snapshot columns only)."""
    if not (fig_dir / "convergence.md").exists():
        return ""
    return md_to_html((fig_dir / "convergence.md").read_text())


def _training_curves_html(fig_dir: Path) -> str:
    """latent_curves.md and teacher_curves.md where benchmark.figures wrote them (sweeps whose
    tokenizer or teacher runs recorded training curves only)."""
    return "\n".join(md_to_html((fig_dir / f).read_text())
                     for f in ("latent_curves.md", "teacher_curves.md") if (fig_dir / f).exists())


def _link(target: Path, page_dir: Path, text: str) -> str:
    rel = Path(os.path.relpath(target.resolve(), page_dir.resolve())).as_posix()
    return f'<a href="{html.escape(rel)}">{html.escape(text)}</a>'


def _cells_html(sweep_dir: Path, page_dir: Path) -> str:
    cells = read_json(sweep_dir / "cells.json")
    wide = pd.read_csv(sweep_dir / "results.csv") if (sweep_dir / "results.csv").exists() else None
    rows = ["<h2>Cells: logs and configs</h2><table><thead><tr><th>cell</th><th>status</th><th>config</th>"
            "<th>stage logs</th><th>failure</th></tr></thead><tbody>"]
    for i, cell in enumerate(cells):
        cid = cell.get("cell_id", "")
        d = sweep_dir / "cells" / cid
        status = failure = ""
        if wide is not None and i < len(wide):
            status = str(wide.iloc[i].get("status", ""))
            f = wide.iloc[i].get("failure")
            failure = "" if f is None or (isinstance(f, float) and pd.isna(f)) else str(f)
        cfg = _link(d / "config.yaml", page_dir, "config.yaml") if (d / "config.yaml").exists() else "–"
        stages = [s for s in STAGE_ORDER if s in cell.get("nodes", {})] + \
                 [s for s in cell.get("nodes", {}) if s not in STAGE_ORDER]
        logs = []
        for s in stages:
            if (d / f"{s}.log").exists():
                logs.append(_link(d / f"{s}.log", page_dir, s))
            if (d / f"{s}.failed.json").exists():
                logs.append(_link(d / f"{s}.failed.json", page_dir, f"{s} (failed)"))
        rows.append(f"<tr><td>{html.escape(cell.get('label', cid))}<br><code>{html.escape(cid)}</code></td>"
                    f"<td>{html.escape(status)}</td><td>{cfg}</td><td>{' · '.join(logs) or '–'}</td>"
                    f"<td>{html.escape(failure)}</td></tr>")
    rows.append("</tbody></table>")
    sweep_files = [f for f in ("results.csv", "results_long.csv", "results_over_seeds.csv", "config.yaml",
                               "cell_configs.yaml") if (sweep_dir / f).exists()]
    rows.append("<p>Sweep files: " + " · ".join(_link(sweep_dir / f, page_dir, f) for f in sweep_files) + "</p>")
    return "\n".join(rows)


def _tables_html(sweep_dir: Path) -> str:
    if (sweep_dir / "results.md").exists():
        return md_to_html((sweep_dir / "results.md").read_text())
    from benchmark.aggregate import over_seeds, results_markdown
    wide = pd.read_csv(sweep_dir / "results.csv")
    return md_to_html(results_markdown(wide, over_seeds(wide)))


def write_report(sweep_dir: Path, page_dir: Path, paper_fig_dir: Path | None = None) -> Path:
    """Write ``page_dir/report.html`` for the exported sweep in ``sweep_dir``."""
    fig_dir = page_dir / "figures"
    name = sweep_dir.name
    body = [f"<h1>Sweep {html.escape(name)}</h1>",
            "<p>Generated from the exported results folder by <code>python -m benchmark.figures</code>; "
            "every number comes from <code>results.csv</code>. FID values here use few samples and are only "
            "comparable at equal <code>n_samples</code>/<code>n_ref</code>, never with the paper's 50K-sample "
            "numbers; the real-vs-real floor under each table is what real images score at the same counts.</p>",
            _tables_html(sweep_dir), _ranking_html(fig_dir), _convergence_html(fig_dir),
            _training_curves_html(fig_dir), _figures_html(fig_dir, "Figures")]
    if paper_fig_dir is not None and (paper_fig_dir / "manifest.json").exists():
        body.append(_figures_html(paper_fig_dir, "The paper's tables drawn the same way (for comparing shapes)"))
    body.append(_cells_html(sweep_dir, page_dir))
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>DMVAE prior bench: {html.escape(name)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    write_text(page_dir / "report.html", page)
    log.info("%s: report -> %s", name, page_dir / "report.html")
    return page_dir / "report.html"


def main(argv: list[str] | None = None) -> None:
    from benchmark.export import PAPER_DIR, find_sweeps
    ap = argparse.ArgumentParser(prog="python -m benchmark.report",
                                 description="Write <out>/<sweep>/report.html for every exported sweep "
                                             "(figures drawn earlier by python -m benchmark.figures).")
    ap.add_argument("--results", type=Path, default=Path("results"), help="the exported results folder (default: results)")
    ap.add_argument("--out", type=Path, default=None, help="where benchmark.figures wrote (default: the results folder)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = a.out or a.results
    try:
        sweeps = find_sweeps(a.results)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    for d in sweeps:
        write_report(d, out / d.name, out / PAPER_DIR / "figures")


if __name__ == "__main__":
    main()
