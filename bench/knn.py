"""Benchmark fastgen.knn against its peers in one run: median / 20-80 % quantiles and each peer's
wrong-neighbour count on clustered data far from the origin (the case that breaks fp32).

usage: python -m bench.knn [--quick] [--device cpu|cuda] [--outdir DIR] [--rep-ms MS] [--k K]
                          [--threads T] [--rounds R] [--peers a,b] [--cases i,j] [--no-sweep]
                          [--isa auto|all|baseline,avx2,avx512]  (rows fastgen-cpu[<path>], one per CPU path)

On a shared machine use --rounds R: every peer is timed R times per case, the rounds interleaved
(peer A, B, ..., A, B, ...), so that a busy spell hits all peers alike; a row's median_ms is the
median of the R medians and its note lists them with their minimum. --threads T sets torch's and
faiss's thread counts (the CSV file is named after it: cpu-<T>t-...).

Data: N queries and M keys drawn around 100 unit-normal cluster centres (std 1e-2) and offset by
1e3 in every coordinate (issue 8). "wrong" counts the queries whose k indices differ from the
exact answer: the float64 brute force (fastgen.reference.knn) where it is affordable (--quick),
else fastgen's certified "cpu" result (on CUDA "torch"), itself checked against the other
exact backends in the same run (their own "wrong" column).

Peers (those importable here):
  fastgen-<backend>     fastgen.knn, exact: cpu (C++ kernel), torch, faiss (+ triton on CUDA)
  faiss                 faiss.knn / faiss.knn_gpu on the raw data (exact-flat search in fp32)
  cdist+topk            torch.cdist (its default mm mode) then topk
  cdist-direct+topk     torch.cdist(compute_mode="donot_use_mm_for_euclid_dist") then topk
  mm-expansion-fp32     ||q||^2 + ||k||^2 - 2 q k^T (fp32 matmul) then topk
  mm-expansion-tf32     the same with TF32 matmuls (CUDA only)
  mm-only-fp32          torch.mm into a preallocated N x M output: a floor, not a kNN
  pykeops-argKmin       pykeops LazyTensor Kmin_argKmin (if pykeops imports)
Matrix peers are chunked over queries so that no N x M block exceeds 2^28 elements.
Cases: the CPU targets of issue 8 (1437 x 14370 x 64, 4096 x 16384 x 64, 2048 x 16384 x 512),
and on CUDA its GPU shapes (16384 x 65536 x 512, 10000 x 100000 x 3072, 65536 x 262144 x 64);
plus a sweep over M (N = 1024, D = 64) for the time-vs-M plot written beside the CSV.
"""
from __future__ import annotations

import contextlib
import os

import torch

from bench.harness import Recorder, bench, parser, with_isa_paths

import fastgen
from fastgen import _dispatch
from fastgen.reference.knn import knn as ref_knn

CPU_CASES = [(1437, 14370, 64), (4096, 16384, 64), (2048, 16384, 512)]
GPU_CASES = [(16384, 65536, 512), (10000, 100000, 3072), (65536, 262144, 64)]
QUICK_CASES = [(256, 2048, 64), (64, 2048, 512)]
SLOW_PEERS = ("cdist-direct+topk", "pykeops-argKmin")


def clustered(n: int, m: int, D: int, *, n_clusters: int = 100, std: float = 1e-2, offset: float = 1e3,
              seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n_clusters, D, generator=g)
    q = c[torch.randint(n_clusters, (n,), generator=g)] + std * torch.randn(n, D, generator=g) + offset
    k = c[torch.randint(n_clusters, (m,), generator=g)] + std * torch.randn(m, D, generator=g) + offset
    return q.to(device), k.to(device)


def _rows_per_chunk(N: int, M: int) -> int:
    return max(1, min(N, (1 << 28) // max(1, M)))


def _chunked_topk(dist_fn, q, key, k):
    N, M = q.shape[0], key.shape[0]
    step = _rows_per_chunk(N, M)
    out_d, out_i = [], []
    for s in range(0, N, step):
        d = dist_fn(q[s:s + step], key)
        v, i = torch.topk(d, k, dim=1, largest=False)
        out_d.append(v)
        out_i.append(i)
    return torch.cat(out_d), torch.cat(out_i)


@contextlib.contextmanager
def _tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _expansion(q, key):
    return (q * q).sum(1, keepdim=True) + (key * key).sum(1)[None] - 2.0 * (q @ key.T)


def peers(device: torch.device, k: int, threads: int | None = None) -> dict:
    cuda = device.type == "cuda"
    p = {}
    here = [b for b in ("cpu", "triton", "faiss", "torch")
            if _dispatch.unavailable_reason("knn", b, device.type) is None]
    for b in here:
        p[f"fastgen-{b}"] = (lambda q, key, b=b: fastgen.knn(q, key, k, backend=b))
    if cuda and "triton" in here:  # tuning peer: bf16 candidate passes for fp32 inputs (still exact)
        from fastgen.ops.knn_triton import knn_triton

        p["fastgen-triton-bf16"] = lambda q, key: knn_triton(q, key, k, _precision="bf16")
    try:
        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        if cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            import faiss.contrib.torch_utils  # noqa: F401

            res = faiss.StandardGpuResources()
            p["faiss-gpu"] = lambda q, key: faiss.knn_gpu(res, q, key, k)
        elif not cuda:
            p["faiss-cpu"] = lambda q, key: tuple(torch.from_numpy(a) for a in faiss.knn(q.numpy(), key.numpy(), k))
    except ImportError:
        pass
    p["cdist+topk"] = lambda q, key: _chunked_topk(torch.cdist, q, key, k)
    p["cdist-direct+topk"] = lambda q, key: _chunked_topk(
        lambda a, b: torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist"), q, key, k)
    if cuda:
        def exp32(q, key):
            with _tf32(False):
                return _chunked_topk(_expansion, q, key, k)

        def exp_tf32(q, key):
            with _tf32(True):
                return _chunked_topk(_expansion, q, key, k)

        p["mm-expansion-fp32"] = exp32
        p["mm-expansion-tf32"] = exp_tf32
    else:
        p["mm-expansion-fp32"] = lambda q, key: _chunked_topk(_expansion, q, key, k)
    try:
        from pykeops.torch import LazyTensor

        def keops(q, key):
            d = ((LazyTensor(q[:, None, :]) - LazyTensor(key[None, :, :])) ** 2).sum(-1)
            return d.Kmin_argKmin(k, dim=1)

        p["pykeops-argKmin"] = keops
    except Exception:  # pykeops absent or without a compiler
        pass
    return p


def _mm_floor(q, key, device):
    """torch.mm into a preallocated output, chunked like the matrix peers: a floor, not a kNN."""
    N, M = q.shape[0], key.shape[0]
    step = _rows_per_chunk(N, M)
    buf = torch.empty(min(N, step), M, device=device)

    def run():
        for s in range(0, N, step):
            e = min(N, s + step)
            torch.mm(q[s:e], key.T, out=buf[: e - s])

    return run


def _exact(q, key, k, quick: bool, device) -> torch.Tensor:
    if quick:
        return ref_knn(q, key, k)[1]
    return fastgen.knn(q, key, k, backend="cpu" if device.type == "cpu" and
                       _dispatch.unavailable_reason("knn", "cpu", "cpu") is None else "torch")[1]


def _plot_vs_m(rows: list, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in sorted({r[1] for r in rows}):
        pts = sorted((m, t) for m, i, t in rows if i == impl)
        ax.plot([m for m, _ in pts], [t for _, t in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("M (keys); D = 64, clustered, offset 1e3")
    ax.set_ylabel("median ms")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def _timed_rounds(fns: dict, rounds: int, device, rep_ms: float, slow: set) -> dict:
    """Time every fn in fns, rounds times, the rounds interleaved; slow peers get one round."""
    out = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if r and name in slow:
                continue
            out[name].append(bench(fn, device=device, rep_ms=rep_ms, min_reps=3 if name in slow else 5))
    return out


def _summarise(tms: list) -> tuple[dict, str]:
    """The round whose median is the median of the medians, and a note listing all medians."""
    tms = sorted(tms, key=lambda t: t["median_ms"])
    mid = tms[(len(tms) - 1) // 2]
    if len(tms) == 1:
        return mid, ""
    meds = "/".join(f"{t['median_ms']:.1f}" for t in tms)
    return mid, f"{len(tms)} rounds: medians {meds} ms; min-of-medians {tms[0]['median_ms']:.1f}"


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=1, help="neighbours per query (default 1)")
    p.add_argument("--no-sweep", action="store_true", help="skip the time-vs-M sweep")
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds per case (default 1)")
    p.add_argument("--peers", default=None, help="comma-separated peer names to run (default: all)")
    p.add_argument("--cases", default=None, help="comma-separated indices into the case list (default: all)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    k = args.k
    cases = QUICK_CASES if args.quick else (GPU_CASES if cuda else CPU_CASES)
    if args.cases:
        cases = [cases[int(c)] for c in args.cases.split(",")]
    sweep = [1024, 4096] if args.quick else ([16384, 65536, 262144, 1048576] if cuda else [4096, 16384, 65536])
    rep_ms = args.rep_ms or (30.0 if args.quick else (300.0 if cuda else 1500.0))
    rec = Recorder("knn", args.outdir, device)
    impls = peers(device, k, args.threads)
    if args.peers:
        want = args.peers.split(",")
        unknown = sorted(set(want) - set(impls) - {"mm-only-fp32"})
        if unknown:
            raise SystemExit(f"unknown or unavailable peers {unknown}; here: {sorted(impls)}")
        impls = {n: f for n, f in impls.items() if n in want}
    # --isa: fastgen's C++ kernel once per CPU path, rows fastgen-cpu[<path>]
    cpu_names = []
    if "fastgen-cpu" in impls:
        impls, cpu_names = with_isa_paths(impls, "fastgen-cpu", args, device)
    floor_on = not args.peers or "mm-only-fp32" in args.peers.split(",")
    summary = []
    for (N, M, D) in cases:
        case = f"{N}x{M}x{D} k={k}"
        q, key = clustered(N, M, D, device=device)
        exact = _exact(q, key, k, args.quick, device)
        wrong, fns = {}, {}
        for name, fn in impls.items():
            slow = name in SLOW_PEERS
            if slow and not args.quick and (N * M * D > 4e10 or (cuda and N * M * D > 4e11)):
                rec.add(case, name, q.dtype, "fwd", None, note="skipped: too slow at this size")
                continue
            try:
                d, i = fn(q, key)
            except Exception as e:  # a peer that cannot run this shape (memory, k limits)
                rec.add(case, name, q.dtype, "fwd", None, note=f"failed: {type(e).__name__}: {str(e)[:80]}")
                continue
            i = torch.as_tensor(i).to(exact.device).reshape(exact.shape).long()
            wrong[name] = int((i != exact).any(dim=1).sum())
            fns[name] = (lambda fn=fn: fn(q, key))
        if floor_on:
            fns["mm-only-fp32"] = _mm_floor(q, key, device)
        timed = _timed_rounds(fns, args.rounds, device, rep_ms, set(SLOW_PEERS) | {"fastgen-faiss", "fastgen-torch"})
        res, res_min = {}, {}
        for name, tms in timed.items():
            tm, note = _summarise(tms)
            res[name], res_min[name] = tm["median_ms"], min(t["median_ms"] for t in tms)
            if name == "mm-only-fp32":
                rec.add(case, name, q.dtype, "fwd", tm,
                        note="floor: the matmul alone, not a kNN" + (f"; {note}" if note else ""))
            else:
                rec.add(case, name, q.dtype, "fwd", tm, wrong=f"{wrong[name]}/{N}", note=note)
        if "fastgen-triton" in res:  # which tier settled the queries, and the same shape on random data
            from fastgen.ops.knn_triton import knn_triton

            tiers = knn_triton(q, key, k, _tiers=True)[2]
            rec.add(case, "fastgen-triton", q.dtype, "tiers", None, note="queries settled by tier 1/2/3/4: " +
                    "/".join(str(int((tiers == t).sum())) for t in (1, 2, 3, 4)))
            g = torch.Generator(device=device).manual_seed(2)
            qr = torch.randn(N, D, device=device, generator=g)
            kr = torch.randn(M, D, device=device, generator=g)
            for name in ("fastgen-triton", "fastgen-triton-bf16", "faiss-gpu"):
                if name in res:
                    tm = bench(lambda: impls[name](qr, kr), device=device, rep_ms=rep_ms)
                    rec.add(case + " random", name, qr.dtype, "fwd", tm, note="unit-normal data")
            del qr, kr
        if not cuda and not args.quick and D >= 128:
            # the same shape on unit-normal data: no cluster structure, so the cpu backend's
            # cluster pruning (fastgen/ops/knn.py _pruned_search) cannot help: its worst case
            g = torch.Generator().manual_seed(2)
            qr, kr = torch.randn(N, D, generator=g), torch.randn(M, D, generator=g)
            rnd = {}
            for name in cpu_names + ["faiss-cpu"]:
                if name in impls:
                    tm = bench(lambda: impls[name](qr, kr), device=device, rep_ms=rep_ms)
                    rnd[name] = tm["median_ms"]
                    rec.add(case + " random", name, qr.dtype, "fwd", tm, note="unit-normal data, no cluster structure")
            for name in cpu_names:
                if name in rnd and "faiss-cpu" in rnd:
                    summary.append(f"{case} random (unit-normal, no clusters): {name} {rnd[name]:.1f} ms, "
                                   f"{rnd['faiss-cpu'] / rnd[name]:.2f}x vs faiss-cpu ({rnd['faiss-cpu']:.1f} ms)")
            del qr, kr
        ours_list = [n for n in cpu_names if n in res] or \
            [n for n in ("fastgen-cpu", "fastgen-triton", "fastgen-torch") if n in res][:1]
        for ours in ours_list:
            for peer in ("faiss-cpu", "faiss-gpu", "cdist+topk", "mm-expansion-fp32"):
                if peer in res:
                    summary.append(f"{case}: {ours} {res[ours]:.1f} ms, {res[peer] / res[ours]:.2f}x vs {peer} "
                                   f"({res[peer]:.1f} ms); min-of-medians {res_min[ours]:.1f} vs "
                                   f"{res_min[peer]:.1f} ms ({res_min[peer] / res_min[ours]:.2f}x)")
        del q, key, exact
    if not args.no_sweep:
        pts = []
        sweep_impls = cpu_names + [n for n in ("fastgen-cpu", "fastgen-triton", "fastgen-torch", "faiss-cpu", "faiss-gpu",
                                   "cdist+topk") if n in impls]
        ns = 256 if args.quick else 1024
        for M in sweep:
            q, key = clustered(ns, M, 64, device=device, seed=1)
            exact = _exact(q, key, 1, args.quick, device) if k == 1 else None
            for name in sweep_impls:
                fn = impls[name]
                d, i = fn(q, key)
                wrong = "" if exact is None else \
                    f"{int((torch.as_tensor(i).to(exact.device).reshape(exact.shape) != exact).any(1).sum())}/{ns}"
                tm = bench(lambda: fn(q, key), device=device, rep_ms=rep_ms / 2)
                rec.add(f"sweep {ns}x{M}x64 k={k}", name, q.dtype, "fwd", tm, wrong=wrong)
                pts.append((M, name, tm["median_ms"]))
        os.makedirs(args.outdir, exist_ok=True)
        _plot_vs_m(pts, os.path.join(args.outdir, f"knn_vs_M-{rec.dev_name}.png"))
    rec.save()
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
