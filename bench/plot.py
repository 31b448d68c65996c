"""Plot benchmark CSVs: one panel per op, median time (20/80 % whiskers) per case and impl.

usage: python -m bench.plot results/<device>.csv [...]   (writes <csv stem>.png beside each CSV)"""
from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict


def plot(path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("median_ms")]
    # keep the newest row per (op, case, impl, dtype, mode)
    latest = {}
    for r in rows:
        latest[(r["op"], r["case"], r["impl"], r["dtype"], r["mode"])] = r
    by_op = defaultdict(list)
    for r in latest.values():
        by_op[r["op"]].append(r)
    n = max(1, len(by_op))
    fig, axes = plt.subplots(n, 1, figsize=(12, 3.6 * n), squeeze=False)
    for ax, (op, rs) in zip(axes[:, 0], sorted(by_op.items())):
        cases = sorted({(r["case"], r["mode"], r["dtype"]) for r in rs})
        impls = sorted({r["impl"] for r in rs})
        w = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs, ys, lo, hi = [], [], [], []
            for i, c in enumerate(cases):
                for r in rs:
                    if (r["case"], r["mode"], r["dtype"]) == c and r["impl"] == impl:
                        m = float(r["median_ms"])
                        xs.append(i + j * w)
                        ys.append(m)
                        lo.append(m - float(r["p20_ms"] or m))
                        hi.append(float(r["p80_ms"] or m) - m)
            ax.bar(xs, ys, width=w, yerr=[lo, hi], label=impl)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{c}\n{m} {d}" for c, m, d in cases], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"{op} ({os.path.basename(path)})")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")
    return out


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    for p in paths:
        plot(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
