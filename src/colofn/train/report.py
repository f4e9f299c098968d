"""The end of a ``colofn train`` run: a loss-curve image (SVG) and a short report (Markdown)."""

from __future__ import annotations

import html
import json
import math
import os
from typing import Any


def loss_curve_svg(steps: list[int], losses: list[float], single: list[float | None], width: int = 640, height: int = 360) -> str:
    """A self-contained SVG line plot of the loss (and the single-device loss when checked)."""
    pad = 48
    ys = [v for v in losses + [s for s in single if s is not None]]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = min(steps), max(steps)
    x1 = x1 if x1 > x0 else x0 + 1

    def pt(x: float, y: float) -> str:
        px = pad + (x - x0) / (x1 - x0) * (width - 2 * pad)
        py = height - pad - (y - lo) / (hi - lo) * (height - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    lines = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
        f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">step</text>',
        f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">loss</text>',
        f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{hi:.3g}</text>',
        f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end">{lo:.3g}</text>',
        f'<text x="{pad}" y="{height - pad + 16}" text-anchor="middle">{x0}</text>',
        f'<text x="{width - pad}" y="{height - pad + 16}" text-anchor="middle">{x1}</text>',
        '<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="'
        + " ".join(pt(x, y) for x, y in zip(steps, losses, strict=True)) + '"/>',
    ]
    ref = [(x, y) for x, y in zip(steps, single, strict=True) if y is not None]
    if ref:
        lines.append('<polyline fill="none" stroke="#d62728" stroke-width="1" stroke-dasharray="4 3" points="'
                     + " ".join(pt(x, y) for x, y in ref) + '"/>')
    lines.append(f'<text x="{width - pad}" y="{pad - 8}" text-anchor="end" fill="#1f77b4">parallel</text>')
    if ref:
        lines.append(f'<text x="{width - pad}" y="{pad + 8}" text-anchor="end" fill="#d62728">single device</text>')
    if ref:
        lines += _diff_panel(steps, losses, single, width, height, pad)
    lines.append("</svg>")
    svg = "\n".join(lines)
    if ref:  # the panel below the loss plot: the image grows by its height
        svg = svg.replace(f'height="{height}"', f'height="{height + DIFF_PANEL}"', 2)
    return svg


DIFF_PANEL = 200  # px: the |parallel - single device| panel, log scale


def _diff_panel(steps: list[int], losses: list[float], single: list[float | None], width: int, top: int, pad: int) -> list[str]:
    """|parallel - single-device loss| per checked step on a log10 axis (an exact 0 is drawn at the floor)."""
    pts = [(x, abs(a - b)) for x, a, b in zip(steps, losses, single, strict=True) if b is not None]
    logs = [math.log10(d) for _, d in pts if d > 0]
    lo = math.floor(min(logs)) if logs else -8
    hi = max(math.ceil(max(logs)) if logs else lo + 1, lo + 1)
    x0, x1 = min(steps), max(steps)
    x1 = x1 if x1 > x0 else x0 + 1
    y_top, y_bot = top + 20, top + DIFF_PANEL - 30

    def pt(x: float, d: float) -> str:
        v = math.log10(d) if d > 0 else lo
        px = pad + (x - x0) / (x1 - x0) * (width - 2 * pad)
        py = y_bot - (v - lo) / (hi - lo) * (y_bot - y_top)
        return f"{px:.1f},{py:.1f}"

    return [
        f'<line x1="{pad}" y1="{y_bot}" x2="{width - pad}" y2="{y_bot}" stroke="black"/>',
        f'<line x1="{pad}" y1="{y_top}" x2="{pad}" y2="{y_bot}" stroke="black"/>',
        f'<text x="{pad - 4}" y="{y_top + 4}" text-anchor="end">1e{hi}</text>',
        f'<text x="{pad - 4}" y="{y_bot}" text-anchor="end">1e{lo}</text>',
        f'<text x="{width / 2}" y="{y_top - 6}" text-anchor="middle">|parallel - single device| (log scale; 0 at the floor)</text>',
        '<polyline fill="none" stroke="#2ca02c" stroke-width="2" points="' + " ".join(pt(x, d) for x, d in pts) + '"/>',
    ]


def write(out: str, record: dict[str, Any]) -> tuple[str, str]:
    """Write ``loss_curve.svg``, ``report.md`` and ``record.json`` under ``out``; returns the first two paths."""
    os.makedirs(out, exist_ok=True)
    svg = os.path.join(out, "loss_curve.svg")
    with open(svg, "w") as f:
        f.write(loss_curve_svg(record["steps"], record["loss"], record["single"]))
    with open(os.path.join(out, "record.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    cfg = record["config"]
    diffs = [abs(a - b) for a, b in zip(record["loss"], record["single"], strict=True) if b is not None]
    tps = record["tokens_per_s"]
    mem = record["bytes_per_rank"][-1] if record["bytes_per_rank"] else []
    lines = [
        "# colofn train report",
        "",
        f"- model: `{('hf:' + cfg['hf']) if cfg.get('hf') else cfg['preset']}`, mesh: {html.escape(record['mesh'])}, ZeRO: {cfg['zero']}, sp: {cfg['sp']}"
        + (f", schedule {cfg['schedule']}" if "pp" in dict(cfg["mesh"]) else ""),
        f"- steps {record['steps'][0] if record['steps'] else 0}..{record['steps'][-1] if record['steps'] else 0}: "
        f"loss {record['loss'][0]:.4f} -> {record['loss'][-1]:.4f}" if record["loss"] else "- no steps run",
        f"- throughput: median {sorted(tps)[len(tps) // 2]:,.0f} tokens/s" if tps else "",
        f"- params + optimizer state per rank (bytes): {mem}",
    ]
    if record.get("eval_loss") is not None:
        lines.append(f"- held-out loss (the last 10% of the data, never trained on): {record['eval_loss']:.4f}")
    if diffs:
        lines.append(f"- checked against single-device training: max |loss difference| {max(diffs):.2e} over {len(diffs)} steps")
    comm = record.get("comm_per_step")
    if comm is not None:
        total = sum(b for _, b in comm.values())
        lines.append(f"- communication per step (rank 0, bytes sent as by a ring algorithm): {_bytes(total)}"
                     + "".join(f"\n  - {html.escape(k)}: {n} op(s), {_bytes(b)}" for k, (n, b) in comm.items()))
    split = record.get("time_split")
    if split:
        first, last = record["time_split_steps"]
        lines.append(f"- time per step, mean of steps {first}..{last}, per rank: compute + communication + wait of the step, ms "
                     "(communication: the least time any rank was blocked in communication that step; "
                     "wait: this rank's blocked time beyond it; compute: the rest)"
                     + "".join(f"\n  - rank {r}: {1e3 * split['compute'][r]:.1f} + {1e3 * split['communication'][r]:.1f}"
                               f" + {1e3 * split['wait'][r]:.1f} of {1e3 * split['step'][r]:.1f}" for r in range(len(split["step"]))))
    idle = record.get("pipeline_idle")
    if idle is not None:
        lines.append("- pipeline bubble of the last step (idle per pipeline rank, against `simulate()` of the same "
                     f"schedule with the measured action times): {html.escape(idle['summary'])}")
    rss = record.get("peak_rss_per_rank")
    if rss:
        lines.append("- peak resident memory per rank process (simulated ranks share one process): "
                     + ", ".join(_bytes(b) for b in rss))
    lines += ["", "![loss curve](loss_curve.svg)", ""]
    md = os.path.join(out, "report.md")
    with open(md, "w") as f:
        f.write("\n".join(line for line in lines if line is not None) + "\n")
    return svg, md


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
