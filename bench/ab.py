"""Before / after in one run: the same workloads on two (or more) fastgen source trees, interleaved.

    python -m bench.ab --tree before=/path/to/old/checkout --tree after=. [--rounds 3] [--threads 2]
                       [--only gaussian_nll,knn] [--outdir bench/out]

Each round runs every tree once, in turn, each in a fresh subprocess (``PYTHONPATH=<tree>``, so
the tree's own built extension ``fastgen/_C*.so`` is used): the machine's drift hits every tree
alike. A tree's result per workload is the median over rounds of the per-round medians
(do_bench style, :func:`bench.harness.bench`); the table gives each tree's time and its ratio to the
first tree; rows go to ``<outdir>/ab-<device>.csv`` (:class:`bench.harness.Recorder` columns, the
tree name in ``impl``). The workloads call only public functions that every fastgen release has.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# name -> (op, description, python source of a zero-argument callable `fn` built from `torch`, `fastgen`)
WORKLOADS = {
    "nll_fb": ("gaussian_nll", "fwd+bwd 1024x16384 fp32, per-element var, mean", """
x = torch.randn(1024, 16384, requires_grad=True); t = torch.randn(1024, 16384)
v = (torch.rand(1024, 16384) + 0.1).requires_grad_()
def fn():
    x.grad = v.grad = None
    fastgen.gaussian_nll_loss(x, t, v).backward()
"""),
    "nll_f": ("gaussian_nll", "fwd 1024x16384 fp32, no grad", """
x = torch.randn(1024, 16384); t = torch.randn(1024, 16384); v = torch.rand(1024, 16384) + 0.1
def fn():
    with torch.no_grad():
        fastgen.gaussian_nll_loss(x, t, v)
"""),
    "nll_none_fb": ("gaussian_nll", "fwd+bwd 1024x16384 fp32, var [1024, 1], reduction none", """
x = torch.randn(1024, 16384, requires_grad=True); t = torch.randn(1024, 16384)
v = (torch.rand(1024, 1) + 0.1).requires_grad_(); g = torch.randn(1024, 16384)
def fn():
    x.grad = v.grad = None
    fastgen.gaussian_nll_loss(x, t, v, reduction="none").backward(g)
"""),
    "nll_small_fb": ("gaussian_nll", "fwd+bwd 8x3 fp32 (per-call overhead)", """
x = torch.randn(8, 3, requires_grad=True); t = torch.randn(8, 3); v = (torch.rand(8, 3) + 0.1).requires_grad_()
def fn():
    x.grad = v.grad = None
    fastgen.gaussian_nll_loss(x, t, v).backward()
"""),
    "noise_f": ("spread_noise", "fwd 2^24 fp32, sigma 0.5", """
x = torch.randn(1 << 24)
def fn():
    fastgen.spread_noise(x, 0.5)
"""),
    "noise_fb": ("spread_noise", "fwd+bwd 4096x4096 fp32, per-dimension sigma [4096]", """
x = torch.randn(4096, 4096, requires_grad=True); s = torch.full((4096,), 0.5, requires_grad=True)
def fn():
    x.grad = s.grad = None
    fastgen.spread_noise(x, s).sum().backward()
"""),
    "sll_f": ("spread_log_likelihood", "fwd 4096x16384x64 fp32, offset 1e3", """
y = torch.randn(4096, 64) * 0.1 + 1e3; xs = torch.randn(16384, 64) * 0.1 + 1e3
def fn():
    with torch.no_grad():
        fastgen.spread_log_likelihood(y, xs, 0.5)
"""),
    "sll_fb": ("spread_log_likelihood", "fwd+bwd 1024x16384x64 fp32 (grad y, samples)", """
y = torch.randn(1024, 64, requires_grad=True); xs = torch.randn(16384, 64, requires_grad=True)
def fn():
    y.grad = xs.grad = None
    fastgen.spread_log_likelihood(y, xs, 0.5).sum().backward()
"""),
    "knn_64": ("knn", "k=1 4096x16384x64 fp32, clustered, offset 1e3", """
g = torch.Generator().manual_seed(0)
c = torch.randn(64, 64, generator=g) * 1e-2 + 1e3
q = c[torch.randint(64, (4096,), generator=g)] + torch.randn(4096, 64, generator=g) * 1e-2
k = c[torch.randint(64, (16384,), generator=g)] + torch.randn(16384, 64, generator=g) * 1e-2
def fn():
    fastgen.knn(q, k)
"""),
    "knn_512": ("knn", "k=1 2048x16384x512 fp32, clustered, offset 1e3", """
g = torch.Generator().manual_seed(0)
c = torch.randn(64, 512, generator=g) * 1e-2 + 1e3
q = c[torch.randint(64, (2048,), generator=g)] + torch.randn(2048, 512, generator=g) * 1e-2
k = c[torch.randint(64, (16384,), generator=g)] + torch.randn(16384, 512, generator=g) * 1e-2
def fn():
    fastgen.knn(q, k)
"""),
    "imle_fb": ("imle_loss", "fwd+bwd samples 14370x64, data 1437x64 fp32", """
s = torch.randn(14370, 64, requires_grad=True); d = torch.randn(1437, 64)
def fn():
    s.grad = None
    fastgen.imle_loss(s, d).backward()
"""),
    "knn_fb": ("knn", "fwd+bwd k=4 4096x16384x64 fp32 (grad query and key)", """
q = torch.randn(4096, 64, requires_grad=True); k = torch.randn(16384, 64, requires_grad=True)
def fn():
    q.grad = k.grad = None
    fastgen.knn(q, k, 4)[0].sum().backward()
"""),
    "knn_small": ("knn", "k=1 32x64x16 fp32, no grad (per-call overhead)", """
q = torch.randn(32, 16); k = torch.randn(64, 16)
def fn():
    fastgen.knn(q, k)
"""),
    "imle_small_fb": ("imle_loss", "fwd+bwd samples 64x16, data 32x16 fp32 (per-call overhead)", """
s = torch.randn(64, 16, requires_grad=True); d = torch.randn(32, 16)
def fn():
    s.grad = None
    fastgen.imle_loss(s, d).backward()
"""),
}

_CHILD = """
import json, sys, torch
torch.set_num_threads({threads})
import fastgen
from bench.harness import bench
out = {{}}
for name, src in json.loads(sys.argv[1]).items():
    env = {{"torch": torch, "fastgen": fastgen}}
    exec(src, env)
    out[name] = bench(env["fn"], rep_ms={rep_ms})
    del env
print("AB-RESULT " + json.dumps(out))
"""


def _run_tree(path: str, names: list[str], threads: int, rep_ms: float) -> dict:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this tree's bench.harness
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(path), here]))
    src = json.dumps({n: WORKLOADS[n][2] for n in names})
    code = _CHILD.format(threads=threads, rep_ms=rep_ms)
    res = subprocess.run([sys.executable, "-c", code, src], env=env, capture_output=True, text=True,
                         cwd=os.path.abspath(path))
    for line in res.stdout.splitlines():
        if line.startswith("AB-RESULT "):
            return json.loads(line[len("AB-RESULT "):])
    raise RuntimeError(f"tree {path} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a fastgen checkout (built)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rep-ms", type=float, default=300.0)
    ap.add_argument("--only", default="", help="comma-separated workload names or ops")
    ap.add_argument("--outdir", default="bench/out")
    args = ap.parse_args(argv)
    trees = [t.split("=", 1) for t in args.tree]
    only = [s for s in args.only.split(",") if s]
    names = [n for n, (op, _, _) in WORKLOADS.items() if not only or n in only or op in only]
    per = {name: {n: [] for n in names} for name, _ in trees}
    for r in range(args.rounds):
        for name, path in trees:
            res = _run_tree(path, names, args.threads, args.rep_ms)
            for n in names:
                per[name][n].append(res[n]["median_ms"])
            print(f"round {r + 1}/{args.rounds} {name}: "
                  + ", ".join(f"{n} {res[n]['median_ms']:.3f}" for n in names), flush=True)
    from bench.harness import Recorder  # noqa: E402  (torch import only here)

    rec = Recorder("ab", args.outdir)
    base = trees[0][0]
    print(f"\n{'workload':14s} " + " ".join(f"{name:>12s}" for name, _ in trees) + "   ratio to " + base)
    for n in names:
        meds = {name: statistics.median(per[name][n]) for name, _ in trees}
        print(f"{n:14s} " + " ".join(f"{meds[name]:12.3f}" for name, _ in trees) + "   "
              + " ".join(f"{meds[name] / meds[base]:.3f}" for name, _ in trees[1:]))
        for name, _ in trees:
            rec.add(f"{n}: {WORKLOADS[n][1]}", name, "float32", "ab",
                    {"median_ms": meds[name], "p20_ms": min(per[name][n]), "p80_ms": max(per[name][n]),
                     "reps": args.rounds, "peak_mem_mib": float("nan")},
                    note=f"median of {args.rounds} interleaved rounds' medians (p20/p80 columns: min/max round)")
    print("wrote", rec.save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
