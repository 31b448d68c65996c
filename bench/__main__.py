"""Run every benchmark: `python -m bench [--quick] [--device cpu|cuda] [--outdir DIR]`.

--quick runs every bench at small sizes (a CPU smoke run, under a few minutes)."""
from __future__ import annotations

import importlib
import sys
import traceback

BENCHES = ["knn", "knn_cuda", "gaussian_nll", "spread_noise", "spread_log_likelihood", "select_latents"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = [a.split("=", 1)[1] for a in argv if a.startswith("--only=")]
    argv = [a for a in argv if not a.startswith("--only=")]
    failed = []
    for name in BENCHES:
        if only and name not in only[0].split(","):
            continue
        print(f"===== bench.{name} {' '.join(argv)}", flush=True)
        try:
            mod = importlib.import_module(f"bench.{name}")
            mod.main(argv)
        except Exception:
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
