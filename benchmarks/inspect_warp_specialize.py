"""Whether Triton splits the descriptor kernel's key loops into producer and consumer warps, per arch.

Compiles the default descriptor-path configs (fp16, head dims 64 and 128) for sm_90 and sm_100 with and
without ``warp_specialize`` (no GPU needed) and writes one JSON row each, as ``python -m csa_kernels.inspect``
does; ``warp_specialized`` says whether the TTGIR holds a ``ttg.warp_specialize`` op. The stored run:
``benchmarks/results/inspect_warp_specialize_sm90-sm100_triton<version>.json``.

    python benchmarks/inspect_warp_specialize.py [OUT_DIR]
"""

from __future__ import annotations

import json
import os
import sys

import torch

from csa_kernels.inspect import inspect_kernel
from csa_kernels.tuning import as_dict, fixed_config


def main(out_dir: str = "benchmarks/results") -> str:
    import triton

    rows = []
    for arch in (90, 100):
        for head_dim in (64, 128):
            for specialize in (False, True):
                config = fixed_config(head_dim, torch.float16, "tma")
                config = config if isinstance(config, dict) else as_dict(config)
                rows.append(
                    inspect_kernel(
                        arch, head_dim, torch.float16, config, path="tma", warp_specialize=specialize
                    )
                )
                row = rows[-1]
                print(arch, head_dim, specialize, row["warp_specialized"], row["registers"], row["loops"])
    path = os.path.join(out_dir, f"inspect_warp_specialize_sm90-sm100_triton{triton.__version__}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main(*sys.argv[1:])
