"""Ahead-of-time resource report of the Triton kNN kernels for a GPU target, without a GPU.

usage: python -m bench.knn_triton_aot [--arch 90] [--only cand,local,scan,other]

Compiles every autotune configuration of fastgen/ops/knn_triton.py for ``sm_<arch>`` with the
compiler and ptxas that ship with Triton, and prints per config: shared memory, registers,
stack (spills), whether warp-group MMAs (wgmma) or mma.sync were emitted, and whether the
loads were software-pipelined (async copies). Costs no device time: run it before spending
GPU time on tuning. Pointer arguments are compiled as 16-byte aligned and unit strides as 1,
as Triton specialises them at launch for contiguous inputs.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastgen.ops import knn_triton as kt  # noqa: E402

_DIV16 = {"Np", "Mp", "S_OS", "S_OB", "m_chunk"}


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_report(fn, sig: dict, consts: dict, num_warps: int, num_stages: int, target, tag: str) -> None:
    full = {n: sig.get(n, "constexpr") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in full.items()
             if (t.startswith("*") or n in _DIV16) and n not in consts}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs), target=target,
                           options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"{tag:58s} FAILED: {type(e).__name__}: {str(e).splitlines()[-1][:160]}")
        return
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    regs, stack = m.groups() if m else ("?", "?")
    ptx, ttgir = k.asm.get("ptx", ""), k.asm.get("ttgir", "")
    print(f"{tag:58s} smem={k.metadata.shared:7d} regs={regs:>3} stack={stack:>5} "
          f"wgmma={ptx.count('wgmma.mma_async'):3d} mma={ptx.count('mma.sync'):3d} "
          f"pipelined={'async_copy_global_to_local' in ttgir}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--only", default="cand,local,scan,other")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    only = set(args.only.split(","))
    if "cand" in only:
        sig0 = dict(KCOL="*fp32", OUT_V="*fp32", OUT_I="*i32", M="i32", N="i32", m_chunk="i32", Np="i32",
                    Mp="i32", S_OS="i32", S_OB="i32", NB="i32", MB="i32")
        for dt, elt in (("fp32", 4), ("bf16", 2)):
            for Dp, C in ((64, 4), (512, 4), (3072, 4), (128, 32), (1024, 128)):
                for cfg in kt._cand_configs(Dp, C, elt):
                    kw = cfg.kwargs
                    compile_report(kt._candidates_kernel, dict(sig0, QC=f"*{dt}", KC=f"*{dt}"),
                                   dict(Dp=Dp, C=C, DOT_PREC="tf32", **kw), cfg.num_warps, cfg.num_stages, target,
                                   f"tier1 {dt} Dp={Dp} C={C} {kw['BLOCK_N']}x{kw['BLOCK_M']}x{kw['BLOCK_D']} "
                                   f"w{cfg.num_warps} s{cfg.num_stages}")
    if "local" in only:
        sig0 = dict(ROWS="*i32", TB="*fp32", OUT_V="*fp32", OUT_I="*i32", M="i32", D="i32", R="i32",
                    s_kb="i32", s_km="i32", alpha1="fp32", NB="i32", MB="i32")
        for dt, kdt, cg, rnd in (("fp32", "fp32", "fp32", 1), ("bf16", "fp16", "fp32", 2), ("fp32", "fp64", "fp64", 1)):
            for Dp, C in ((64, 4), (512, 4), (3072, 4)):
                for cfg in kt._local_configs(Dp, C, 4 if dt == "fp32" else 2):
                    kw = cfg.kwargs
                    compile_report(kt._local_kernel, dict(sig0, QL=f"*{dt}", K=f"*{kdt}", CG=f"*{cg}"),
                                   dict(Dp=Dp, C=C, ROUND=rnd, DOT_PREC="tf32", CBLK=kt._LOCAL_BLOCK, s_kd=1, **kw),
                                   cfg.num_warps, cfg.num_stages, target,
                                   f"tier2 {dt}/{kdt} Dp={Dp} C={C} {kw['BLOCK_N']}x{kw['BLOCK_M']}x{kw['BLOCK_D']} "
                                   f"w{cfg.num_warps} s{cfg.num_stages}")
    if "scan" in only:
        sig0 = dict(FLAG="*i32", OUT_D="*fp64", OUT_I="*i64", PERM="*i64", N="i32", M="i32", D="i32", k="i32",
                    n_blocks="i32", s_qb="i32", s_qn="i32", s_kb="i32", s_km="i32", s_fb="i32", s_ob="i32",
                    beta="fp64", tiny="fp64")
        for tier, kp, xdt, acc in ((3, 4, "fp32", tl.float32), (3, 32, "fp32", tl.float32), (3, 128, "fp32", tl.float32),
                                   (3, 4, "bf16", tl.float32), (3, 4, "fp64", tl.float64), (4, 1, "fp32", tl.float64),
                                   (4, 16, "fp32", tl.float64), (4, 64, "fp32", tl.float64)):
            cfg = kt._scan_config(tier, kp, False, acc == tl.float64)
            w = cfg.pop("num_warps")
            compile_report(kt._scan_kernel, dict(sig0, Q=f"*{xdt}", K=f"*{xdt}"),
                           dict(s_qd=1, s_kd=1, TIER=tier, ACC=acc, KP=kp, **cfg), w, 1, target,
                           f"tier{tier} {xdt} KP={kp} {cfg['BLOCK_N']}x{cfg['BLOCK_M']}")
    if "other" in only:
        for xdt in ("fp32", "fp16", "fp64"):
            compile_report(kt._center_kernel,
                           dict(X=f"*{xdt}", MU="*fp64" if xdt == "fp64" else "*fp32", XC="*fp32", NR2="*fp32",
                                NU2="*fp32", R="i32", D="i32", Rp="i32", n_rblocks="i32", s_xb="i64", s_xr="i32",
                                s_mub="i32"),
                           dict(ROUND=1, Dp=512, BLOCK_R=32, BLOCK_D=64, s_xd=1), 4, 1, target, f"centre {xdt}")
        for C in (4, 32, 128):
            compile_report(kt._rerank_kernel,
                           dict(Q="*fp32", K="*fp32", IDX="*i32", OUT="*fp64", ROWS="*i32", N="i32", D="i32",
                                n_blocks="i32", s_qb="i32", s_qn="i32", s_kb="i32", s_km="i32", s_ib="i32", s_in="i32"),
                           dict(C=C, HAS_ROWS=True, BLOCK_N=kt._rerank_config(C, False)["BLOCK_N"], s_qd=1, s_kd=1,
                                s_ic=1), 4, 1, target, f"rerank C={C}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
