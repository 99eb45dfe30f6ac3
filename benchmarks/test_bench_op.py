"""pytest-benchmark view of the op suite, for CI-style runs and history comparison.

    python -m pytest benchmarks/ --benchmark-enable                  # CPU: tiny shapes
    python -m pytest benchmarks/ --benchmark-enable --benchmark-autosave   # on a GPU: real shapes

Same providers and shapes as `storydiff bench` (storydiff/benchmark/), with the same correctness gate:
a provider is benchmarked only after it passes ``csa_kernels.reference_error_bound``.
"""

import pytest
import torch

from csa_kernels import reference_error_bound
from storydiff.benchmark.op_suite import cpu_cases, cpu_dit_cases, dit_cases, headline_cases, make_case_inputs
from storydiff.benchmark.providers import UNGATED, default_providers, setup_provider

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
# plus one joint text + image case (FLUX layout: only image rows borrow)
CASES = headline_cases() + dit_cases()[:1] if DEVICE.type == "cuda" else cpu_cases()[:2] + cpu_dit_cases()[:1]


@pytest.mark.parametrize("provider", default_providers(DEVICE))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_op(benchmark, case, provider):
    inputs = make_case_inputs(case, DTYPE, DEVICE)
    fn = setup_provider(provider, inputs)
    if provider not in UNGATED:
        reference_error_bound(inputs).check(fn())
    benchmark.group = case.name
    if DEVICE.type == "cuda":
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
    else:
        benchmark(fn)
