"""Benchmark of IMLE latent re-selection (fastgen.imle.select_latents) at digits scale:
1437 examples x 64 pixels, pool 10 x (14370 candidates), MLP generator 32-512-512-64.

The re-selection time is split into its two parts, timed separately on the same chunks:
generator time (the pool through the MLP under no_grad) and NN-search time (fastgen.knn of the
data against each chunk of samples), plus the full select_latents call. Issue 5 target on CPU:
NN search <= 30 % of the re-selection time.

    python -m bench.select_latents [--quick] [--device cpu|cuda] [--outdir DIR]
"""
from __future__ import annotations

import torch

from bench.harness import Recorder, bench, parser


def _mlp(latent_dim, out_dim, device):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(latent_dim, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, out_dim), torch.nn.Sigmoid()).to(device)


def main(argv=None):
    import fastgen
    from fastgen import _dispatch

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pool-factor", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None, help="select_latents chunk (default: its own)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    rep_ms = a.rep_ms if a.rep_ms is not None else (300.0 if a.quick else 2000.0)
    N, D, L = 1437, 64, 32
    if a.device == "cuda" and not a.quick:
        cases = [(N, D, L, a.pool_factor), (60000, 784, 64, 10)]     # digits, MNIST scale
    else:
        cases = [(N, D, L, a.pool_factor)]
    rec = Recorder("select_latents", a.outdir, dev)
    for (n, d, lat, pf) in cases:
        pool = pf * n
        gen = _mlp(lat, d, dev)
        data = torch.rand(n, d, device=dev)
        bs = a.batch_size or min(pool, 8192)
        case = f"{n}x{pool}x{d}"
        g = torch.Generator(device=dev).manual_seed(0)
        chunks = [torch.randn(min(bs, pool - s), lat, generator=g, device=dev) for s in range(0, pool, bs)]
        with torch.no_grad():
            samples = [gen(z) for z in chunks]

        def gen_only():
            with torch.no_grad():
                for z in chunks:
                    gen(z)

        t_gen = bench(gen_only, device=dev, rep_ms=rep_ms, min_reps=3)
        rec.add(case, "generator", "float32", "fwd", t_gen, note=f"MLP {lat}-512-512-{d}, chunks of {bs}")
        from fastgen.imle.train import _Autocast, native_bf16

        gen_bf16 = _Autocast(gen) if native_bf16(dev) else None
        if gen_bf16 is not None:     # what `fastgen demo` runs on CPUs with native bf16 (AVX512-BF16 / AMX)
            def gen_bf16_only():
                with torch.no_grad():
                    for z in chunks:
                        gen_bf16(z)

            t_gen16 = bench(gen_bf16_only, device=dev, rep_ms=rep_ms, min_reps=3)
            rec.add(case, "generator[bf16 autocast]", "bfloat16", "fwd", t_gen16, note="as in fastgen demo")
        name, _ = _dispatch.select("knn", "auto", dev.type)
        backends = [name] + [b for b in ("cpu", "faiss", "torch", "triton", "cuda")
                             if b != name and _dispatch.unavailable_reason("knn", b, dev.type) is None]
        if a.device == "cpu":
            backends = [b for b in backends if b != "triton"]        # the interpreter is not a CPU backend
        t_nn = {}
        for b in backends:
            def nn_only(b=b):
                for s in samples:
                    fastgen.knn(data, s, 1, backend=b)

            t_nn[b] = bench(nn_only, device=dev, rep_ms=rep_ms, min_reps=3)
            rec.add(case, f"knn[{b}]", "float32", "fwd", t_nn[b], note="auto" if b == name else "")
        def select_row(g, b, t_g, label, dtype, note):
            def full():
                fastgen.imle.select_latents(g, data, pool_size=pool, latent_dim=lat, batch_size=bs,
                                            rng=torch.Generator(device=dev).manual_seed(1), backend=b)

            t_full = bench(full, device=dev, rep_ms=rep_ms, min_reps=3)
            frac = t_nn[b]["median_ms"] / (t_nn[b]["median_ms"] + t_g["median_ms"])
            rec.add(case, label, dtype, "fwd", t_full, note=note.format(100 * frac))

        for b in backends[:1] + (backends[1:] if not a.quick else []):
            select_row(gen, b, t_gen, f"select_latents[{b}]", "float32",
                       "NN share {:.0f}% (knn / (knn + generator)); target <= 30%")
        if gen_bf16 is not None:
            select_row(gen_bf16, backends[0], t_gen16, f"select_latents[{backends[0]}, bf16 generator]", "bfloat16",
                       "NN share {:.0f}%; target <= 30%")
    rec.save()


if __name__ == "__main__":
    main()
