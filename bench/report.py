"""
Turn a reproduction's results (bench/reproduce.sh) into the README's table and loss curves.

    python bench/report.py out-cpu        # prints markdown, writes out-cpu/report.md (+ curves PNG)
    python bench/report.py out-cpu --compare=bench/reproduce_cpu_2026-11-25.md
        # the same, with an earlier report's val loss and task accuracy beside each row of the same label
"""

import json
import os
import platform
import sys


def report_rows(path):
    """label -> (val loss, task acc) as strings, from the first table of a report.md."""
    rows = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] not in ("run", "---"):
            rows.setdefault(cells[0], (cells[1], cells[2]))
    return rows


def main(out, compare=None):
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    earlier = report_rows(compare) if compare else None
    times = {}
    if os.path.exists(os.path.join(out, "times.tsv")):
        for line in open(os.path.join(out, "times.tsv")):
            name, sec = line.split("\t")
            times[name] = int(sec)
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'}).", "",
             "| run | val loss | task acc | KV bytes/token | decode tok/s | loops (decode) |",
             "|---|---|---|---|---|---|"]
    if earlier is not None:
        lines[2:4] = [f"| run | val loss | task acc | val loss in {os.path.basename(compare)} | difference | "
                      "task acc there |", "|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['task_acc']:.3f}" if "task_acc" in r else "-"
        if "task_acc_by_question" in r:   # all_queries lines: each question of a line, first to last
            acc += " (by question: " + " / ".join(f"{a:.2f}" for a in r["task_acc_by_question"]) + ")"
        if "task_acc_by_hops" in r:        # chain lines: every question of each depth
            acc += " (by hops: " + ", ".join(f"{h}: {a:.2f}" for h, a in r["task_acc_by_hops"].items()) + ")"
        if earlier is not None:
            val0, acc0 = earlier.get(r["label"], ("-", "-"))
            diff = f"{r['val_loss'] - float(val0):+.4f}" if val0 != "-" else "-"
            lines.append(f"| {r['label']} | {r['val_loss']:.4f} | {acc} | {val0} | {diff} | {acc0} |")
            continue
        lines.append(f"| {r['label']} | {r['val_loss']:.4f} | {acc} | {r['kv_bytes_per_token']:,} | "
                     f"{r['decode_tok_s']:.0f} | {r['mean_loops_decode']:.2f} |")
    lines += ["", "| training run | wall time |", "|---|---|"]
    lines += [f"| {k} | {v // 60} min {v % 60} s |" for k, v in times.items()]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no loss-curve plot; pip install matplotlib)")
        return
    for data in ("shakespeare_char", "reasoning"):
        fig, ax = plt.subplots(figsize=(7, 4))
        offset = 0
        for name in ("looplm", "phase1", "phase2"):
            path = os.path.join(out, data, name, "log.jsonl")
            if not os.path.exists(path):
                continue
            log = [json.loads(line) for line in open(path)]
            ax.plot([offset + r["step"] for r in log], [r.get("val_ce", r["val_loss"]) for r in log], marker="o",
                    label={"looplm": "LoopLM teacher", "phase1": "MELT phase 1 (transition)",
                           "phase2": "MELT phase 2 (distillation)"}[name])
            if name == "phase2" and "teacher_val_ce" in log[0]:
                ax.axhline(log[0]["teacher_val_ce"], color="gray", ls="--", lw=1, label="teacher (LoopLM) val CE")
            offset += log[-1]["step"]
        ax.set(xlabel="step (phases back to back)", ylabel="val cross-entropy (train-time chunks)", title=data)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        png = os.path.join(out, f"curves_{data}.png")
        fig.savefig(png, dpi=110)
        print(f"wrote {png}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--compare=")]
    compare = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--compare=")]
    main(args[0] if args else "out-cpu", compare[0] if compare else None)
