import triton
import triton.language as tl


@triton.jit
def fused_pointwise_b0ad4f74c663a93f(in_ptr0, in_ptr1, out_ptr0, xnumel, XBLOCK: tl.constexpr):
    xoffset = tl.program_id(0).to(tl.int64) * XBLOCK
    xindex = xoffset + tl.arange(0, XBLOCK)
    xmask = xindex < xnumel
    tmp0 = tl.load(in_ptr0 + xindex, xmask, other=0).to(tl.float32)
    tmp1 = tl.load(in_ptr1 + xindex, xmask, other=0).to(tl.float32)
    tmp2 = (tmp0 + tmp1).to(tl.float32)
    tl.store(out_ptr0 + xindex, tmp2.to(tl.float32), xmask)
