"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test module
imports kernels.triton.* (nothing else imports them on a machine without CUDA).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
