"""Imported before conftest.py and anything it imports, so Triton's interpreter (TRITON_INTERPRET=1) is
on before the first `import triton` (Lightning brings it in): without a GPU the Triton kernels run on
CPU tensors there (tests/test_scan_kernel.py)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
