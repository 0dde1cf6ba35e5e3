"""python -m node.simulate.panels OUT... --png FILE: the charts of several runs of node.simulate (their
--out folders) stacked in one PNG, top to bottom in the order given (docs/simulation.png)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from node.simulate import plot


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m node.simulate.panels")
    p.add_argument("outs", nargs="+", type=Path, help="--out folders of node.simulate runs")
    p.add_argument("--png", type=Path, required=True)
    p.add_argument("--height", type=int, default=200)
    args = p.parse_args(argv)
    stack = []
    for out in args.outs:
        path = out / "series.json"
        if not path.exists():
            p.error(f"{path} does not exist: run python -m node.simulate --out {out} first")
        stack.append(json.loads(path.read_text())["series"])
    args.png.write_bytes(plot.panels(stack, height=args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
