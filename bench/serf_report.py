"""Output of bench/bench_vs_serf.py: the text tables and the PNG plot, from
the result rows (dicts) the runs return. Rules: reads rows only, measures
nothing; matplotlib (the ``bench`` extra) is imported only to plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serf_agents import HSG, SERF


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    w = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols}
    lines = ["  ".join(f"{c:>{w[c]}}" for c in cols)]
    lines += ["  ".join(f"{r.get(c)!s:>{w[c]}}" for c in cols) for r in rows]
    return "\n".join(lines)


LOOP_COLS = ["system", "agents", "converge_s", "converge_from_spawn_s", "unhealthy_s",
             "failed_s", "failed_by", "cpu_pct", "rss_mib", "udp_Bps", "udp_ip_Bps", "udp_pps",
             "tcp_ip_Bps", "source"]
LOSS_COLS = ["system", "loss_pct", "measured_drop_pct", "false_unhealthy", "false_failed",
             "pairs_unhealthy", "pairs_failed", "log_suspect", "log_failed", "source"]


def plot(loop: list[dict[str, Any]], loss: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [("udp_Bps", "UDP payload bytes/s sent per agent"),
              ("cpu_pct", "idle CPU per agent (% of a core)"),
              ("rss_mib", "RSS per agent (MiB)"),
              ("converge_s", "full membership (s after all answer)"),
              ("failed_s", "SIGKILLed agent seen failed by all, s (hs-gossip: dead)")]
    style = {HSG: ("tab:blue", "o"), SERF: ("tab:orange", "s")}
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for kind in (HSG, SERF):
            pts = [(r["agents"], r[key]) for r in loop if r["system"] == kind
                   and r[key] is not None]
            if pts:
                color, marker = style[kind]
                ax.plot(*zip(*pts, strict=True), marker=marker, color=color, label=kind)
        if key == "failed_s":
            pts = [(r["agents"], r["unhealthy_s"]) for r in loop if r["system"] == HSG
                   and r["unhealthy_s"] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", linestyle="--",
                        color="tab:blue", label=f"{HSG} unhealthy")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("agents")
        ax.set_xticks(sorted({r["agents"] for r in loop}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax = axes.flat[5]
    if loss:
        levels = sorted({r["loss_pct"] for r in loss})
        # Serf's members list never says "suspect": its suspicions come from
        # the memberlist log lines
        bars = [(HSG, "false_unhealthy", "tab:cyan"), (HSG, "false_failed", "tab:blue"),
                (SERF, "log_suspect", "navajowhite"), (SERF, "false_failed", "tab:orange")]
        width = 0.8 / len(bars)
        top = 0
        for j, (kind, key, color) in enumerate(bars):
            vals = [next((r[key] or 0 for r in loss if r["system"] == kind
                          and r["loss_pct"] == p), 0) for p in levels]
            xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(levels))]
            got = ax.bar(xs, vals, width, color=color, label=f"{kind} {key.replace('_', ' ')}")
            ax.bar_label(got, fontsize=7)
            top = max(top, *vals)
        ax.set_ylim(0, max(1, top) * 1.15)
        ax.set_xticks(range(len(levels)), [f"{p} % loss" for p in levels])
        n = loss[0]["agents"]
        ax.set_title(f"false verdicts, {n} agents in netns, {loss[0]['window_s']:g} s",
                     fontsize=10)
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    fig.suptitle("hs-gossip vs Serf, same machine, same run (loopback; one address per agent)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
