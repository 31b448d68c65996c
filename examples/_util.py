"""Shared plumbing of the examples: argument parser with --out, JSON writing, matplotlib (Agg)."""
from __future__ import annotations

import argparse
import json
import os


def parser(name: str, desc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"examples/{name}.py", description=desc)
    p.add_argument("--out", default=os.path.join("runs", "examples", name),
                   help=f"output folder for the figure and the JSON (default runs/examples/{name})")
    p.add_argument("--seed", type=int, default=0)
    return p


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(out: str, name: str, result: dict) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


def save(fig, out: str, name: str, result: dict, dpi: int = 100) -> None:
    """Write the figure <out>/<name>.png (tight layout) and <out>/<name>.json, close the figure."""
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    fig.savefig(os.path.join(out, f"{name}.png"), dpi=dpi)
    plt().close(fig)
    write_json(out, name, result)
