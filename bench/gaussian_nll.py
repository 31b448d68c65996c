"""Benchmark gaussian_nll_loss: fwd, bwd and fwd+bwd (median, 20 / 80 % quantiles, peak memory) of
fastgen (auto backend: the C++ kernel on CPU, Triton on GPU) against F.gaussian_nll_loss, the same
formula in torch eager, and torch.compile of that formula, in one run.

usage: python -m bench.gaussian_nll [--quick] [--device cpu|cuda] [--outdir DIR] [--no-compile]
                                   [--isa auto|all|baseline,avx2,avx512]

--isa times fastgen's C++ kernel on each CPU path (rows fastgen-cpu[<path>]) beside the same peers.

Modes: "fwd" is the forward of a training step (inputs require grad: fastgen's fused kernel also
writes the gradients there), "bwd" the backward alone (forward untimed before each repetition),
"fwd+bwd" both. Targets (issue 4): this 2-core CPU, fp32 1024 x 16384 with per-element var,
fwd+bwd >= 5x faster than F.gaussian_nll_loss and >= 2x faster than torch.compile; H100 fp32
8192 x 16384, fwd+bwd <= 1.05 ms with peak memory <= inputs + gradients + 1 MiB.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench.harness import Recorder, bench, bench_backward, parser, use_compile, with_isa_paths

import fastgen
from fastgen import _dispatch
from fastgen.reference.gaussian_nll import nll_formula


def _formula(x, t, v):
    return nll_formula(x, t, v, False, 1e-6, "mean")


def main(argv=None) -> int:
    args = parser(__doc__.splitlines()[0], compile_peer=True).parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.quick:
        shapes = [((256, 4096), "elem"), ((256, 4096), "row")]
        dtypes = [torch.float32]
    elif cuda:
        shapes = [((8192, 16384), "elem"), ((8192, 16384), "row")]
        dtypes = [torch.float32, torch.bfloat16]
    else:
        shapes = [((1024, 16384), "elem"), ((1024, 16384), "row")]
        dtypes = [torch.float32]
    rep_ms = args.rep_ms or (50.0 if args.quick else (400.0 if cuda else 3000.0))
    compiled_peer = use_compile(args)
    rec = Recorder("gaussian_nll", args.outdir, device)
    backend = _dispatch.select("gaussian_nll", "auto", device.type)[0]
    compiled = torch.compile(_formula, dynamic=False) if compiled_peer else None

    impls = {f"fastgen-{backend}": fastgen.gaussian_nll_loss, "F.gaussian_nll_loss": F.gaussian_nll_loss,
             "torch-eager-formula": _formula}
    if compiled is not None:
        impls["torch.compile-formula"] = compiled
    impls, our_names = with_isa_paths(impls, f"fastgen-{backend}", args, device)

    summary = []
    for (shape, vkind) in shapes:
        for dtype in dtypes:
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
            t = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
            vshape = shape if vkind == "elem" else (shape[0], 1)
            v = (torch.rand(vshape, generator=g) + 0.1).to(device=device, dtype=dtype).requires_grad_()
            case = f"{shape[0]}x{shape[1]} var={vkind}"
            in_mib = sum(a.numel() * a.element_size() for a in (x, t, v)) / 2**20
            grad_mib = sum(a.numel() * a.element_size() for a in (x, v)) / 2**20

            # correctness of every impl against F (same dtype), loss and gradients
            ref_loss = F.gaussian_nll_loss(x, t, v)
            ref_g = torch.autograd.grad(ref_loss, [x, v])
            medians = {}
            for name, fn in impls.items():
                if name.startswith("torch.compile"):
                    t0 = time.perf_counter()
                    fn(x, t, v).backward()
                    x.grad = v.grad = None
                    compile_note = f"compile {time.perf_counter() - t0:.1f} s"
                else:
                    compile_note = ""
                loss = fn(x, t, v)
                gr = torch.autograd.grad(loss, [x, v])
                err = max(float((loss.float() - ref_loss.float()).abs()),
                          *(float((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-30))
                            for a, b in zip(gr, ref_g)))
                del loss, gr
                wrong = 0 if err < (1e-4 if dtype == torch.float32 else 2e-2) else 1

                def fwd():
                    return fn(x, t, v)

                def fwd_bwd():
                    fn(x, t, v).backward()

                for mode in ("fwd", "bwd", "fwd+bwd"):
                    if mode == "fwd":
                        tm = bench(fwd, device=device, rep_ms=rep_ms)
                    elif mode == "bwd":
                        tm = bench_backward(fwd, [x, v], device=device, rep_ms=rep_ms)
                    else:
                        tm = bench(fwd_bwd, device=device, rep_ms=rep_ms, grad_to_none=[x, v])
                    x.grad = v.grad = None
                    note = compile_note
                    if cuda and mode == "fwd+bwd":
                        note += f" extra mem over grads {tm['peak_mem_mib'] - grad_mib:.2f} MiB (inputs {in_mib:.0f} MiB)"
                    medians[(name, mode)] = tm["median_ms"]
                    rec.add(case, name, dtype, mode, tm, wrong=wrong, max_err=err, note=note.strip())
            for ours in our_names:
                for peer in impls:
                    if peer in our_names:
                        continue
                    r = medians[(peer, "fwd+bwd")] / medians[(ours, "fwd+bwd")]
                    summary.append(f"{case} {str(dtype).replace('torch.', '')} fwd+bwd: {ours} "
                                   f"{medians[(ours, 'fwd+bwd')]:.2f} ms, {r:.2f}x faster than {peer} "
                                   f"({medians[(peer, 'fwd+bwd')]:.2f} ms)")
            del x, t, v, ref_loss, ref_g
    rec.save()
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
