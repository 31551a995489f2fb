import triton
import triton.language as tl


@triton.jit
def fused_reduction_b14716f61ed090fa(in_ptr0, in_ptr1, in_ptr2, out_ptr0, out_ptr1, xnumel, XBLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    xoffset = tl.program_id(0).to(tl.int64) * XBLOCK
    xindex = xoffset + tl.arange(0, XBLOCK)[:, None]
    xmask = xindex < xnumel
    rindex = tl.arange(0, RBLOCK)[None, :]
    rmask = rindex < 16
    tmp0 = tl.load(in_ptr0 + (rindex + 16 * xindex), xmask & rmask, other=0).to(tl.float32)
    tmp1 = tl.load(in_ptr1 + (rindex + 16 * xindex), xmask & rmask, other=0).to(tl.float32)
    tmp2 = (tmp0 + tmp1).to(tl.float32)
    tmp3 = tl.load(in_ptr2 + rindex, rmask, other=0).to(tl.float32)
    tmp4 = (tmp2 * tmp2).to(tl.float32)
    tmp5 = tl.sum(tl.where(xmask & rmask, tmp4, 0), 1)[:, None]
    tmp6 = tmp5 / 16
    tmp7 = (tmp6 + 1e-06).to(tl.float32)
    tmp8 = (tl.rsqrt((tmp7).to(tl.float32))).to(tl.float32)
    tmp9 = (tmp2 * tmp8).to(tl.float32)
    tmp10 = (tmp3 * tmp9).to(tl.float32)
    tl.store(out_ptr0 + (rindex + 16 * xindex), tmp2.to(tl.float32), xmask & rmask)
    tl.store(out_ptr1 + (rindex + 16 * xindex), tmp10.to(tl.float32), xmask & rmask)
