"""Test session set-up: without a GPU, triton kernels run in triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
