"""Benchmark the "cuda" backend of fastgen.knn (csrc/cuda/knn.cu) against the other backends, in one
run, on batched (conditional IMLE) and 2-D shapes, with each peer's wrong-neighbour count.

usage: python -m bench.knn_cuda [--quick] [--device cpu|cuda] [--outdir DIR] [--rep-ms MS]

Data: clustered, std 1e-2, offset 1e3 (as bench/knn.py), drawn per batch element. "wrong" counts
the queries whose k indices differ from the exact answer: the float64 brute force
(fastgen.reference.knn) with --quick, else fastgen's "torch" backend (exact, certified).
Peers (those available here): fastgen-cuda, fastgen-triton, fastgen-faiss, fastgen-torch,
fastgen-cpu (CPU tensors), and cdist+topk (torch.cdist, batched, its default mm mode).
Without a CUDA device the cuda rows are skipped (a row with a note says why) and the other
peers run, so that the script itself is exercised on CPU.

Cases (B, N, M, D, k): conditional IMLE with one example per condition and few samples
(1024, 1, 32, 3072, 1), (4096, 1, 64, 512, 1); several examples per condition (256, 16, 160, 512, 1),
(64, 256, 2560, 64, 4); 2-D: (1, 4, 300000, 64, 8) (few queries: the split over keys) and the first
GPU target of issue 8, (1, 16384, 65536, 512, 1).
"""
from __future__ import annotations

import torch

from bench.harness import Recorder, bench, parser

import fastgen
from fastgen import _dispatch
from fastgen.reference.knn import knn as ref_knn

GPU_CASES = [(1024, 1, 32, 3072, 1), (4096, 1, 64, 512, 1), (256, 16, 160, 512, 1), (64, 256, 2560, 64, 4),
             (1, 4, 300000, 64, 8), (1, 16384, 65536, 512, 1)]
QUICK_CASES = [(64, 1, 32, 256, 1), (16, 8, 160, 64, 2), (1, 4, 20000, 32, 4)]
BACKENDS = ("cuda", "triton", "faiss", "torch", "cpu")


def clustered(B: int, n: int, m: int, D: int, *, n_clusters: int = 8, std: float = 1e-2, offset: float = 1e3,
              seed: int = 0, device="cpu"):
    """[B, n, D] queries and [B, m, D] keys around n_clusters centres per batch element."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(B, n_clusters, D, generator=g)

    def draw(r):
        lab = torch.randint(n_clusters, (B, r), generator=g)
        return torch.gather(c, 1, lab[..., None].expand(B, r, D)) + std * torch.randn(B, r, D, generator=g) + offset

    return draw(n).to(device), draw(m).to(device)


def _cdist_topk(q, key, k):
    step = max(1, (1 << 28) // max(1, q.shape[1] * key.shape[1]))
    out = []
    for b0 in range(0, q.shape[0], step):
        d = torch.cdist(q[b0:b0 + step], key[b0:b0 + step])
        out.append(torch.topk(d, k, dim=-1, largest=False).indices)
    return torch.cat(out)


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rep_ms = args.rep_ms or (30.0 if args.quick else 200.0)
    rec = Recorder("knn_cuda", args.outdir, device)
    cases = QUICK_CASES if args.quick else GPU_CASES
    for B, N, M, D, k in cases:
        case = f"{B}x{N}x{M}x{D}k{k}"
        q, key = clustered(B, N, M, D, seed=B + N + M + D, device=device)
        if args.quick:
            _, want = ref_knn(q, key, k)
        else:
            with torch.no_grad():
                _, want = fastgen.knn(q, key, k, backend="torch")
        for name in BACKENDS:
            why = _dispatch.unavailable_reason("knn", name, device.type)
            if why is not None:
                if name == "cuda":
                    rec.add(case, "fastgen-cuda", q.dtype, "fwd", None, note=f"skipped: {why}"[:200])
                continue
            if name == "torch" and device.type == "cpu" and M * N * B > 1e8:
                continue

            def fn(name=name):
                with torch.no_grad():
                    return fastgen.knn(q, key, k, backend=name)

            _, idx = fn()
            wrong = int((idx != want).any(-1).sum())
            rec.add(case, f"fastgen-{name}", q.dtype, "fwd", bench(fn, device=device, rep_ms=rep_ms), wrong=wrong)
        if N * M * B <= 1 << 30:
            idx = _cdist_topk(q, key, k)
            wrong = int((idx != want).any(-1).sum())
            rec.add(case, "cdist+topk", q.dtype, "fwd",
                    bench(lambda: _cdist_topk(q, key, k), device=device, rep_ms=rep_ms), wrong=wrong)
        del q, key, want
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rec.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
