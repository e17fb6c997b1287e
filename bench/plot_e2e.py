"""Chart of a bench/e2e.py result: time-to-first-audio breakdown (ours vs the reference-style
pipeline) and the concurrent conversations that stay real time.

    python bench/plot_e2e.py docs/perf/e2e_h100.json resources/e2e_breakdown.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = (
    ("tokenize", "speech tokenizer"),
    ("prefill", "prefill (+HTTP)"),
    ("tokens_to_first_block", "tokens until the first block"),
    ("first_block_decode", "first block decode + vocoder"),
)
TARGET_TTFA_MS = 250


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 4.4))
    grid = fig.add_gridspec(2, 2, width_ratios=[3, 2])
    right = fig.add_subplot(grid[:, 1])
    rows = [("ours", results["ttfa"]), ("reference-style", results["reference"])]
    colors = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
    for row, (name, summary) in enumerate(rows):
        axis = fig.add_subplot(grid[row, 0])
        start = ((summary.get("load") or 0) + (summary.get("prompt") or 0)) * 1000
        for (key, label), color in zip(STAGES, colors):
            width = (summary.get(key) or 0) * 1000
            axis.barh(0, width, left=start, color=color, label=label)
            if width > 0.06 * summary["ttfa"] * 1000:
                axis.text(start + width / 2, 0, f"{width:.0f}", ha="center", va="center", color="white", fontsize=8)
            start += width
        total = summary["ttfa"] * 1000
        axis.set_xlim(0, total * 1.25)
        axis.text(start + total * 0.01, 0, f"{total:.0f} ms", va="center")
        if total * 1.25 > TARGET_TTFA_MS:
            axis.axvline(TARGET_TTFA_MS, color="black", linestyle="--", linewidth=1)
            axis.text(TARGET_TTFA_MS, -0.55, f" target {TARGET_TTFA_MS} ms", fontsize=7)
        axis.set_yticks([0], [name])
        axis.set_ylim(-0.6, 1.2 if row == 0 else 0.6)  # room for the legend above the first bar
        if row == 0:
            axis.set_title("Time to first audio, one user, 5 s spoken question (median ms)")
            axis.legend(fontsize=7, loc="upper right", ncols=2)
        else:
            ratio = summary.get("ratio_to_ours")
            axis.set_xlabel(f"ms from the end of the question (reference-style is {ratio}x slower)")

    levels = [results[f"concurrency_{n}"] for n in results["concurrency"]["levels"]]
    xs = [lv["conversations"] for lv in levels]
    rates = [lv["token_rate_min"] for lv in levels]
    bar_colors = ["#55a868" if lv["all_real_time"] else "#c44e52" for lv in levels]
    right.bar([str(x) for x in xs], rates, color=bar_colors)
    right.axhline(18.75, color="black", linestyle="--", linewidth=1)
    right.text(0, 21, "18.75 tok/s: real-time speech", fontsize=8)
    for i, lv in enumerate(levels):
        mark = "no underrun" if lv["all_real_time"] else f"{lv['with_underrun']} underran"
        right.text(i, rates[i] + 3, mark, ha="center", fontsize=7)
    right.set_xlabel("conversations started together (30 s answers each)")
    right.set_ylabel("slowest stream, tokens/s")
    right.set_title("Concurrent conversations on one GPU")
    gpu = results["machine"].get("gpu", "CPU")
    fig.suptitle(f"GLM-4-Voice pipeline, full-size random weights, {gpu}, {results['machine']['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    plot(json.loads(args.results.read_text()), args.out)


if __name__ == "__main__":
    main()
