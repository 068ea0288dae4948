"""The PNG next to the JSON: tokens/s and speedup vs target per run and prompt set."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_png(result: dict[str, Any], path: Path) -> str | None:
    """Bar charts next to the JSON; returns a note when they cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); PNG skipped"
    sets = list(result["sets"])
    runs = list(result["overall"]["runs"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(runs) * len(sets) + 3), 8))
    width = 0.8 / len(sets)
    xs = range(len(runs))
    for j, name in enumerate(sets):
        group = result["sets"][name]["runs"]
        offs = [x - 0.4 + width * (j + 0.5) for x in xs]
        ax1.bar(offs, [group[r]["tokens_per_s"] or 0 for r in runs], width, label=name)
        ax2.bar(offs, [group[r]["speedup_vs_target"] or 0 for r in runs], width, label=name)
    short = {"speculative:": "spec:\n", ":adaptive": "\n+adaptive", ":no-lookup": "\n-lookup"}
    labels = []
    for r in runs:
        for long, abbreviated in short.items():
            r = r.replace(long, abbreviated)
        labels.append(r)
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.legend()
    ax1.set_ylabel("tokens/s (client wall time)")
    ax2.set_ylabel("speedup vs target (wall time)")
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    cfg, m = result["config"], result["machine"]
    fig.suptitle(
        f"{cfg['target_model']} + draft {cfg['draft_model']}, T={cfg['temperature']}, "
        f"max_new_tokens={cfg['max_new_tokens']}, CPU x{m['cpu_count']} "
        f"(load {m['loadavg_start']} -> {m['loadavg_end']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
