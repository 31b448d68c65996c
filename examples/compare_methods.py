"""Side-by-side comparison of the IMLE methods of ``fastgen train`` on digits and grid-gmm.

Runs every (method, data, seed) with the tuned defaults of ``fastgen train`` (one run at a time,
in this process), each writing its run folder under ``--runs-dir``, then writes a markdown
table built only from the metrics.json files (``--out``, default docs/methods_table.md):
mean and spread over seeds of precision / recall / class_coverage (digits; the definitions of
``fastgen demo``) and modes_covered / high_quality_fraction (grid-gmm), with training seconds.
Methods: imle, rs-imle, adaptive-imle, and cimle when the command line offers it.

    python examples/compare_methods.py                       # everything, seeds 0 1 2 (long)
    python examples/compare_methods.py --data digits --seeds 0 1
    python examples/compare_methods.py --table-only          # rebuild the table from runs

A run whose metrics.json exists with the same method, seed and config is reused (``--force``
re-runs it).

``--temperatures T1 T2 ...`` adds a second table for digits: the trained generators (model.pt)
sampled again at other temperatures (z ~ N(0, T^2 I); temperature trades precision for recall),
``--draws`` sample draws of 1000 per run, averaged over draws and seeds (cached in each run
folder as temperature_sweep.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastgen import cli  # noqa: E402

BASE_METHODS = ("imle", "rs-imle", "adaptive-imle")


def available_methods() -> tuple:
    """imle, rs-imle, adaptive-imle, and cimle when ``fastgen train`` has it (guarded: the
    conditional module and its CLI wiring may be absent)."""
    extra = []
    try:
        import fastgen.imle.conditional  # noqa: F401

        if "cimle" in cli.METHODS:
            extra.append("cimle")
    except ImportError:
        pass
    return BASE_METHODS + tuple(extra)


def run_dir(runs_dir: str, method: str, data: str, seed: int) -> str:
    return os.path.join(runs_dir, f"{method}-{data}-s{seed}")


def _load(path: str):
    try:
        with open(os.path.join(path, "metrics.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _fmt(vals, digits=3):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _range(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def temperature_sweep(path: str, temps, draws: int) -> dict:
    """{T: [(precision, recall, class_coverage) per draw]} for the digits run folder ``path``,
    from its model.pt (cached in path/temperature_sweep.json)."""
    import numpy as np
    import torch

    from fastgen import data as datasets
    from fastgen import metrics
    from fastgen.imle.train import MLPGenerator, draw_prior

    cache_path = os.path.join(path, "temperature_sweep.json")
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    todo = [t for t in temps if len(cache.get(f"{t:g}", [])) < draws]
    if todo:
        ck = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=False)
        c = ck["config"]
        split = datasets.load("digits")
        clf = metrics.digits_classifier(split.x_train, split.y_train)
        g = MLPGenerator(c["latent_dim"], split.x_train.shape[1], tuple(c["hidden"]), c["out_act"], skip=c["skip"])
        g.load_state_dict(ck["generator"])
        g.eval()
        for t in todo:
            rows = []
            for d in range(draws):
                z = draw_prior(c["prior"], 1000, c["latent_dim"], torch.Generator().manual_seed(c["seed"] + 1234 + d)) * t
                with torch.no_grad():
                    x = (g(z) * ck["scale"]).clamp(0, ck["scale"]).numpy().reshape(1000, 8, 8).astype(np.float32)
                p, r = metrics.precision_recall(split.x_test, x)
                cc, _ = metrics.class_coverage(x, clf)
                rows.append((p, r, cc))
            cache[f"{t:g}"] = rows
        with open(cache_path, "w") as f:
            json.dump(cache, f)
    return {t: cache[f"{t:g}"][:draws] for t in temps}


def sweep_table(sweeps: dict, draws: int) -> str:
    """Markdown from {(method, T): [(p, r, cc) over seeds x draws], ...}."""
    lines = ["| method | temperature | precision | recall | class_coverage (min) | runs x draws |",
             "|---|---|---|---|---|---|"]
    for (method, t), rows in sweeps.items():
        best = " **(both >= 0.8)**" if (statistics.mean(r[0] for r in rows) >= 0.8
                                        and statistics.mean(r[1] for r in rows) >= 0.8) else ""
        lines.append(f"| {method} | {t:g} | {_fmt([r[0] for r in rows])} | {_fmt([r[1] for r in rows])}{best} | "
                     f"{min(r[2] for r in rows)} | {len(rows) // draws} x {draws} |")
    return "\n".join(["", "### Digits: precision / recall against the sampling temperature", "",
                       "The same trained generators sampled at z ~ N(0, T^2 I); mean ± std over runs and draws "
                       "of 1000 samples.", "", *lines, ""])


def table(runs: dict) -> str:
    """Markdown from {(method, data): [metrics dicts]} (one per seed)."""
    lines = ["| method | data | precision | recall | class_coverage / modes_covered | high_quality_fraction "
             "| train s | temperature | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for (method, data), ms in runs.items():
        if not ms:
            continue
        seeds = ",".join(str(m["config"]["seed"]) for m in ms)
        temp = _range([m["config"].get("temperature") for m in ms])
        secs = _fmt([m.get("train_seconds") for m in ms], 1)
        if data == "digits":
            cov = _range([m.get("class_coverage") for m in ms]) + " / 10"
            lines.append(f"| {method} | {data} | {_fmt([m.get('precision') for m in ms])} | "
                         f"{_fmt([m.get('recall') for m in ms])} | {cov} | - | {secs} | {temp} | {seeds} |")
        else:
            cov = _range([m.get("modes_covered") for m in ms]) + f" / {ms[0].get('n_modes', 25)}"
            lines.append(f"| {method} | {data} | - | - | {cov} | {_fmt([m.get('high_quality_fraction') for m in ms])} "
                         f"| {secs} | {temp} | {seeds} |")
    detail = ["| method | data | seed | precision | recall | coverage | train s |", "|---|---|---|---|---|---|---|"]
    for (method, data), ms in runs.items():
        for m in ms:
            if data == "digits":
                detail.append(f"| {method} | {data} | {m['config']['seed']} | {m['precision']:.3f} | {m['recall']:.3f} "
                              f"| {m['class_coverage']}/10 | {m['train_seconds']:.1f} |")
            else:
                detail.append(f"| {method} | {data} | {m['config']['seed']} | - | - | "
                              f"{m['modes_covered']}/{m['n_modes']} | {m['train_seconds']:.1f} |")
    threads = sorted({m.get("torch_threads") for ms in runs.values() for m in ms if m.get("torch_threads")})
    if any(method == "cimle" and ms for (method, _), ms in runs.items()):
        lines += ["", "cimle (conditional IMLE) is conditioned on the test split: each digit sample is generated for "
                  "the 2 x 2 average-pooled 4 x 4 image of a test digit, each grid sample for a test point's "
                  "x-coordinate. Its precision / recall answer an easier question than the unconditional rows'."]
    return "\n".join([
        "<!-- generated by examples/compare_methods.py from the runs' metrics.json; do not edit by hand -->",
        "### IMLE methods side by side",
        "",
        "Tuned defaults of `fastgen train --method <method>`; mean ± std over seeds (one sample draw per "
        "seed). Digits: improved precision / recall (k = 3, pixel space, test split as the real set) and "
        "classes holding >= 5 % of 1000 samples; grid-gmm: modes holding >= 1 % of 2500 samples within 3 std, "
        f"and the fraction of samples within 3 std of a centre. CPU, torch threads {threads}; training seconds "
        "were taken on a shared machine and are indicative only.",
        "",
        *lines,
        "",
        "<details><summary>per seed</summary>",
        "",
        *detail,
        "",
        "</details>",
        "",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=None, help=f"default: {available_methods()}")
    p.add_argument("--data", nargs="+", default=list(cli.DATASETS), choices=cli.DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="override the tuned epochs (quick checks)")
    p.add_argument("--runs-dir", default="runs/compare")
    p.add_argument("--out", default="docs/methods_table.md")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="re-run even when metrics.json exists")
    p.add_argument("--table-only", action="store_true", help="no training: tabulate the existing runs")
    p.add_argument("--temperatures", nargs="*", type=float, default=[],
                   help="digits: also sample the trained generators at these temperatures")
    p.add_argument("--draws", type=int, default=3, help="sample draws per run and temperature")
    a = p.parse_args(argv)
    methods = tuple(a.methods or available_methods())
    bad = [m for m in methods if m not in cli.METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; fastgen train offers {cli.METHODS}")
    import torch

    torch.set_num_threads(a.threads)
    runs = {}
    for data in a.data:
        for method in methods:
            ms = []
            for seed in a.seeds:
                d = run_dir(a.runs_dir, method, data, seed)
                m = _load(d)
                fresh = m is not None and m.get("method") == method and m["config"].get("seed") == seed
                if fresh and method in cli.IMLE_METHODS:       # same tuned config as now
                    fresh = m["config"] == cli.default_config(data, a.epochs, seed, method).to_dict()
                elif fresh:
                    fresh = a.epochs is None or m["config"].get("epochs") == a.epochs
                if not a.table_only and (a.force or not fresh):
                    t = time.perf_counter()
                    m = cli.run(method, data, d, epochs=a.epochs, seed=seed, progress=False, baseline=False,
                                checkpoint_every=0)
                    print(f"{method} {data} seed {seed}: {cli._summary(m)} ({time.perf_counter() - t:.0f} s)",
                          flush=True)
                if m is not None:
                    ms.append(m)
            runs[(method, data)] = ms
    text = table(runs)
    if a.temperatures and "digits" in a.data:
        sweeps = {}
        for method in methods:
            if method not in BASE_METHODS:        # model.pt of an MLPGenerator only
                continue
            for seed in a.seeds:
                d = run_dir(a.runs_dir, method, "digits", seed)
                if os.path.exists(os.path.join(d, "model.pt")):
                    for t, rows in temperature_sweep(d, a.temperatures, a.draws).items():
                        sweeps.setdefault((method, t), []).extend(rows)
        text += sweep_table(sweeps, a.draws)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
