import triton
import triton.language as tl


@triton.jit
def fused_pointwise_c9cc784f8fb121cb(in_ptr0, in_ptr1, out_ptr0, xnumel, XBLOCK: tl.constexpr):
    xoffset = tl.program_id(0).to(tl.int64) * XBLOCK
    xindex = xoffset + tl.arange(0, XBLOCK)
    xmask = xindex < xnumel
    tmp0 = tl.load(in_ptr0 + xindex, xmask, other=0).to(tl.float32)
    tmp1 = (tl.sigmoid((tmp0).to(tl.float32))).to(tl.float32)
    tmp2 = (tmp0 * tmp1).to(tl.float32)
    tmp3 = tl.load(in_ptr1 + xindex, xmask, other=0).to(tl.float32)
    tmp4 = (tmp2 * tmp3).to(tl.float32)
    tl.store(out_ptr0 + xindex, tmp4.to(tl.float32), xmask)
