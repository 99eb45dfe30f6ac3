"""Redraw a benchmark plot from stored results (never re-runs anything).

python benchmarks/plot_results.py benchmarks/results/op-full_nvidia-h100-80gb-hbm3_*.json
"""

import argparse
from pathlib import Path

from storydiff.benchmark.results import load_rows, panels_for, plot_rows

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by `storydiff bench`")
    for path in parser.parse_args().results:
        rows = load_rows(path)
        print(plot_rows(rows, path.with_suffix(".png"), panels=panels_for(rows)))
