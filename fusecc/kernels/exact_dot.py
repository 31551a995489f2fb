"""tl.dot that keeps fp32 operands fp32, for every hand-written kernel with an fp32 path.

    acc = exact_dot(a, b, acc)        # acc + a @ b; IEEE fp32 products when a is fp32

Triton's default input precision rounds fp32 operands to TF32 (about 1e-3 relative), while eager
fp32 PyTorch (allow_tf32 off, its default) does not: fp32 models are the ones compared exactly
against eager. Half-precision and fp8 operands take the tensor cores' usual path.
"""

import triton
import triton.language as tl


@triton.jit
def exact_dot(a, b, acc):
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)
