"""Attention matching: SDPA calls and eager attention become `fusecc::flash_attention`.

Two shapes of attention reach the ATen graph from transformers models:

1. `fusecc::sdpa` (capture.py keeps SDPA whole), usually fed by HF's `repeat_kv` copy of K/V:

    before:  %u   = aten.unsqueeze(%k, 2)                           # f32[2, 2, 1, 7, 16]
             %e   = aten.expand(%u, [2, 2, 2, 7, 16])               # f32[2, 2, 2, 7, 16] stride 0
             %c   = aten.clone(%e)                                  # the repeat copy
             %kr  = aten._unsafe_view(%c, [2, 4, 7, 16])            # f32[2, 4, 7, 16]
             ... the same for %v -> %vr
             %o   = fusecc.sdpa(%q, %kr, %vr, %mask, False, 0.25)   # mask: b8[2, 1, 7, 7]
    after:   %o   = fusecc.flash_attention(%q, %k, %v, False, 0.25, %mask)   # GQA in the kernel

2. The eager pattern (`attn_implementation="eager"`), softmax decomposed by decompositions.py:

    before:  %s   = aten.bmm(%q3, %kt3)             # [B*H, Sq, D] @ [B*H, D, Sk] (views of q, repeat_kv(k)ᵀ)
             %l   = aten.view(%s, [B, H, Sq, Sk])
             %x   = aten.add(aten.mul(%l, 0.25), %mask)
             %p   = aten.div(exp(%x - amax(%x, -1)), sum(exp(..), -1))
             %o3  = aten.bmm(aten.view(%p, [B*H, Sq, Sk]), %v3)
             %o   = aten.view(%o3, [B, H, Sq, D])
    after:   %o   = fusecc.flash_attention(%q, %k, %v, False, 0.25, %mask)

A rewrite happens only when it is provably the same computation (up to kernel rounding: the
kernel keeps logits and the softmax in fp32 where eager rounds them to the input dtype):
q/k/v 4-d fp16/bf16/fp32 with one head dim <= 256 shared by q, k and v; kv heads dividing q heads;
sizes proven equal (symbolic sizes through the shape environment, without adding guards);
masks bool or additive float of q's dtype, broadcastable to [B, H, Sq, Sk]. SDPA's `is_causal`
is aligned top-left, the kernel's bottom-right: the same only when seq_q == seq_k is proven.
Empty rows: SDPA gives 0 for a fully masked row, as the kernel does; eager softmax gives NaN for
an all -inf row, so the eager pattern is rewritten only under a mask proven finite in its dtype.
A fully masked row is where eager's rounding shows: in fp16/bf16, logits + mask is rounded to
the mask's spacing, so a mask of -65504 (fp16's finfo.min) makes every logit of the row equal
(eager averages v uniformly) while the kernel, in fp32, keeps them apart. So under fp16/bf16 the
mask's values must be small (|m| <= 16, rounding-sized) or huge (|m| >= 1e30, where fp32 rounds
every logit away too: bf16/fp32 `finfo.min`, HF's masks); fp16 cannot hold a huge value.
Anything else stays as it was; `stats["skipped:<reason>"]` and `reasons[node name]` say why.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.sdpa / flash_attention)
from fusecc.passes.base import GraphPass, PassResult
from fusecc.graph.constants import constant_value
from fusecc.graph.matching import NoMatch
from fusecc.graph.node_kinds import alias_root, cast_dtype, is_pure, may_write
from fusecc.passes.rewrite_engine import same_tensor_meta

aten = torch.ops.aten
prims = torch.ops.prims

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256  # what fusecc.kernels.flash_attention supports (attention_tile.check_head_dim)
# value-preserving reshapes (row-major order kept) and copies: what repeat_kv/matmul put between tensors
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default,
             aten.clone.default, aten.contiguous.default}
_VIEWS_OF_MASK = {aten.expand.default, aten.slice.Tensor, aten.unsqueeze.default, aten.view.default,
                  aten._unsafe_view.default, aten.reshape.default, aten.alias.default, aten.clone.default,
                  aten.lift_fresh_copy.default, aten.permute.default, aten.transpose.int, aten.select.int}


class AttentionMatching(GraphPass):
    name = "attention_matching"
    repeat_to_fixed_point = False

    def __init__(self):
        self.reasons: dict[str, str] = {}  # node name -> why it was not rewritten (last run)

    def run(self, gm: fx.GraphModule) -> PassResult:
        self.reasons = {}
        stats: Counter = Counter()
        erased: set = set()
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node in erased:
                continue
            try:
                if node.target is torch.ops.fusecc.sdpa.default:
                    match = _match_sdpa(node)
                elif node.target is aten.bmm.default and _softmax_feeds(node):
                    match = _match_eager(gm, node)
                else:
                    continue
                erased |= _rewrite(gm, match, stats)
            except NoMatch as miss:
                stats[f"skipped:{miss.reason}"] += 1
                self.reasons[node.name] = miss.reason
        if stats["rewritten"]:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, stats["rewritten"] > 0, stats)


# ---------------------------------------------------------------- the two matchers

class _Match:
    """What to build: flash_attention(q, k, v, causal, scale, mask) in place of `anchor`."""

    def __init__(self, kind, anchor, q, k, v, causal, scale, mask, removed, reads_through, n_rep):
        self.kind, self.anchor = kind, anchor
        self.args = (q, k, v, causal, scale, mask)
        self.removed = removed              # nodes of the old computation, erased when dead
        self.reads_through = reads_through  # (copy node, source) pairs: the source is read later
        self.n_rep = n_rep
        self.q_op = None  # (aten.mul/div, 0-d scale tensor node): q is scaled before the kernel


def _match_sdpa(node: fx.Node) -> _Match:
    names = ("query", "key", "value", "attn_mask", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, (None, None, None, None, False, None, False)))
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    q, k, v, mask = bound["query"], bound["key"], bound["value"], bound["attn_mask"]
    causal, scale, gqa = bound["is_causal"], bound["scale"], bound["enable_gqa"]
    qv = _tensor(q)
    B, H, Sq, D = _bhsd(qv, "q")
    k_src, k_rep, k_through, k_nodes = _kv_source(k, B, H, D)
    v_src, v_rep, v_through, v_nodes = _kv_source(v, B, H, D)
    kv, vv = _tensor(k_src), _tensor(v_src)
    if k_rep != v_rep or not _same_shape(kv.shape, vv.shape):
        raise NoMatch("k_v_shapes_differ")
    Hkv, Sk = kv.shape[1], kv.shape[2]
    seen = Hkv * k_rep  # heads of the k/v SDPA reads; enable_gqa repeats them again, h -> h // (H / seen)
    if not (_eq(seen, H) or gqa and isinstance(seen, int) and isinstance(H, int) and H % seen == 0):
        raise NoMatch("heads_mismatch")
    _check_dtypes(qv, kv, vv)
    if causal:
        if mask is not None:
            raise NoMatch("mask_and_is_causal")  # SDPA rejects this combination
        if not _eq(Sq, Sk):
            raise NoMatch("causal_top_left_seq_q_ne_seq_k")  # kernel's causal is bottom-right
    if mask is not None:
        _check_mask(mask, qv, (B, H, Sq, Sk))
    scale = _check_scale(scale)
    return _Match("sdpa", node, q, k_src, v_src, bool(causal), scale, mask, [node] + k_nodes + v_nodes,
                  k_through + v_through, k_rep)


def _softmax_feeds(bmm: fx.Node) -> bool:
    """Cheap pre-filter: the first bmm operand is (a reshape/cast of) a softmax-shaped div."""
    node = _strip(bmm.args[0])[-1]
    while cast_dtype(node) is not None:
        node = node.args[0]
    return _is(node, aten.div.Tensor)


def _match_eager(gm: fx.GraphModule, bmm2: fx.Node) -> _Match:
    # out[b*H + h] = p3[b*H + h] @ v3[b*H + h], viewed straight back to [B, H, Sq, Dv]
    users = list(bmm2.users)
    if len(users) != 1 or users[0].target not in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        raise NoMatch("eager_output_not_viewed_4d")
    anchor = users[0]
    B, H, Sq, Dv = _bhsd(_tensor(anchor), "out")
    BH = B * H
    _require_shape(bmm2, (BH, Sq, Dv))
    # probabilities: softmax over the last dim of the logits, optionally cast back to their dtype
    p_chain = _strip(bmm2.args[0])
    prob_casts, logit_casts, softmax_nodes, x = _softmax_input(p_chain[-1])
    casts = prob_casts + logit_casts
    Sk = _tensor(x).shape[-1]
    _require_shape(bmm2.args[0], (BH, Sq, Sk))
    _require_shape(x, (B, H, Sq, Sk))
    # logits: [mask add] of [scale mul/div] of a reshape of bmm(q3, kt3)
    mask, scaled = _split_add(x)
    scale, logits, q_op = _split_scale(scaled)
    l_chain = _strip(logits)
    bmm1 = l_chain[-1]
    if not _is(bmm1, aten.bmm.default):
        raise NoMatch("eager_logits_not_bmm")
    _require_shape(logits, (B, H, Sq, Sk))
    _require_shape(bmm1, (BH, Sq, Sk))
    core = [anchor, bmm2] + p_chain[:-1] + casts + softmax_nodes + ([x] if mask is not None else []) \
        + ([scaled] if scale is not None else []) + l_chain
    # operands: q3 [B*H, Sq, D] a reshape of q [B, H, Sq, D]; kt3 [B*H, D, Sk] a reshape of kᵀ
    q3, kt3 = bmm1.args
    q_chain = _strip(q3)
    q4 = _find_4d(q_chain, (B, H, Sq, None))
    if q4 is None:
        raise NoMatch("eager_q_not_bhsd")
    qv = _tensor(q4)
    D = qv.shape[3]
    _require_shape(q3, (BH, Sq, D))
    _require_shape(kt3, (BH, D, Sk))
    k_src, k_rep, k_through, k_nodes = _kv_source_transposed(kt3, B, H, D)
    v_src, v_rep, v_through, v_nodes = _kv_source(bmm2.args[1], B, H, Dv)
    kv, vv = _tensor(k_src), _tensor(v_src)
    if k_rep != v_rep or not _same_shape(kv.shape, vv.shape):
        raise NoMatch("k_v_shapes_differ")
    if k_rep * kv.shape[1] != H or not _eq(kv.shape[2], Sk):
        raise NoMatch("kv_shape")
    _check_dtypes(qv, kv, vv)
    # the kernel rounds the probabilities once, to v's dtype (from fp32): a cast on the way to a
    # narrower dtype (a bf16 round trip in an fp32 model) is rounding it would not do
    if any(cast_dtype(c) not in (vv.dtype, torch.float32) for c in prob_casts):
        raise NoMatch("eager_probabilities_rounded")
    if mask is not None:
        if isinstance(mask, fx.Node) and _tensor(mask).dtype == torch.bool:
            raise NoMatch("eager_bool_mask_added")  # logits + bool adds 1.0 where True: not keep/drop
        _check_mask(mask, qv, (B, H, Sq, Sk))
        values = _mask_values(gm, mask)
        if values is None:
            raise NoMatch("eager_mask_may_hold_-inf")  # eager gives NaN on an all -inf row, the kernel 0
        if qv.dtype != torch.float32 and values.medium:
            raise NoMatch("eager_half_mask_rounds_rows")  # see the module docstring
    # the attention weights must feed only this attention (returned weights: keep eager)
    inner = set(core)
    if any(u not in inner for n in core if n is not anchor for u in n.users):
        raise NoMatch("eager_intermediate_used_elsewhere")
    # no mul/div on the logits: eager scales by 1, not by the kernel's default 1/sqrt(D)
    scale = 1.0 if scale is None else _check_scale(scale)
    removed = core + q_chain[:q_chain.index(q4)] + k_nodes + v_nodes
    match = _Match("eager", anchor, q4, k_src, v_src, False, scale, mask, removed,
                   k_through + v_through + _copies(q_chain, q4), k_rep)
    match.q_op = q_op
    return match


def _require_shape(node, shape: tuple) -> None:
    if not _same_shape(_tensor(node).shape, shape):
        raise NoMatch("eager_shapes")


def _softmax_input(p: fx.Node):
    """p = [casts](div(exp(x - amax(x, -1)), sum(exp, -1))) -> (casts of the probabilities,
    casts of the logits, softmax nodes, x in the logits' dtype)."""
    prob_casts = []
    while cast_dtype(p) in _DTYPES:  # the probabilities cast to the dtype of v (the kernel does)
        prob_casts.append(p)
        p = p.args[0]
    casts = []
    if not _is(p, aten.div.Tensor):
        raise NoMatch("eager_no_softmax")
    e, s = p.args
    if not (_is(e, aten.exp.default) and _is(s, aten.sum.dim_IntList) and s.args[0] is e
            and _last_dim_keepdim(s)):
        raise NoMatch("eager_no_softmax")
    sub = e.args[0]
    if not (_is(sub, aten.sub.Tensor) and _is(sub.args[1], aten.amax.default) and not sub.kwargs):
        raise NoMatch("eager_no_softmax")
    amax = sub.args[1]
    x = sub.args[0]
    if amax.args[0] is not x or not _last_dim_keepdim(amax):
        raise NoMatch("eager_no_softmax")
    nodes = [p, e, s, sub, amax]
    while cast_dtype(x) == torch.float32 and _tensor(x.args[0]).dtype in _DTYPES:
        # softmax computed in fp32 on fp16/bf16/fp32 logits: the kernel does so too. Any other
        # cast (to an integer, or narrowing to bf16) rounds the logits first: not the same math
        casts.append(x)
        x = x.args[0]
    return prob_casts, casts, nodes, x


def _split_add(x: fx.Node):
    """x = add(scaled, mask) with the logits [B, H, Sq, Sk] on one side -> (mask, scaled)."""
    if not _is(x, aten.add.Tensor) or x.kwargs.get("alpha", 1) != 1 or len(x.args) != 2:
        return None, x
    a, b = x.args
    if not all(isinstance(t, fx.Node) for t in (a, b)):
        return None, x
    for scaled, mask in ((a, b), (b, a)):
        if _same_shape(_tensor(scaled).shape, _tensor(x).shape) and _leads_to_bmm(scaled):
            return mask, scaled
    return None, x


def _leads_to_bmm(node: fx.Node) -> bool:
    if _is(node, aten.mul.Tensor) or _is(node, aten.div.Tensor):
        node = node.args[0]
    return _strip(node)[-1].target is aten.bmm.default


def _split_scale(node: fx.Node):
    """mul(l, c) / div(l, c) -> (scale, l, q_op); else (None, node, None). A Python number c is
    the kernel's scale; a 0-d float tensor c (Dynamo lifts `self.scaling` to a graph input under
    dynamic shapes) is applied to q instead, `q_op(q, c)` (same math, one rounding moved)."""
    if not (_is(node, aten.mul.Tensor) or _is(node, aten.div.Tensor)) or len(node.args) != 2:
        return None, node, None
    l, c = node.args
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        c = float(c)
        if node.target is aten.mul.Tensor:
            return c, l, None
        if c > 0:
            return 1.0 / c, l, None
        raise NoMatch("eager_bad_scale")
    if isinstance(c, fx.Node):
        cv = _tensor(c)
        if cv.dim() == 0 and cv.dtype.is_floating_point and _tensor(l).dtype == _tensor(node).dtype:
            return 1.0, l, (node.target, c)
    raise NoMatch("eager_bad_scale")


# ---------------------------------------------------------------- operands

def _kv_source(node: fx.Node, B, H, D):
    """K or V as read by attention: [B, H', S, D] or its [B*H', S, D] reshape. Returns
    (source [B, Hkv, S, D], n_rep, [(copy, source)], chain nodes) with H' = Hkv * n_rep, seeing
    through HF's repeat_kv:
        reshape(clone(expand(unsqueeze(src, 2), [B, Hkv, n_rep, S, D])), [B, Hkv * n_rep, S, D])
    (row-major, so head h reads kv head h // n_rep: the kernel's GQA mapping)."""
    chain = _strip(node)
    base = chain[-1]
    if _is(base, aten.expand.default):
        ev, uv = _tensor(base), _tensor(base.args[0])
        if ev.dim() == 5 and uv.dim() == 5 and _eq(uv.shape[2], 1) and \
                all(_eq(ev.shape[i], uv.shape[i]) for i in (0, 1, 3, 4)):
            src_chain = _strip(base.args[0])
            src = _find_4d(src_chain, (B, ev.shape[1], ev.shape[3], D))
            n_rep = ev.shape[2]
            if src is not None and isinstance(n_rep, int):
                _check_kv_start(node, _tensor(src), n_rep)
                return (src, n_rep, _copies(chain, base) + _copies(src_chain, src),
                        chain + src_chain[:src_chain.index(src)])
        elif _same_shape(ev.shape, uv.shape):  # expand to its own shape (matmul's): a no-op
            src, n_rep, through, nodes = _kv_source(base.args[0], B, H, D)
            _check_kv_start(node, _tensor(src), n_rep)
            return src, n_rep, through, chain + nodes
    src = _find_4d(chain, (B, None, None, D))
    if src is None:
        raise NoMatch("kv_not_bhsd")
    _check_kv_start(node, _tensor(src), 1)
    return src, 1, _copies(chain, src), chain[:chain.index(src)]


def _check_kv_start(node: fx.Node, src: torch.Tensor, n_rep: int) -> None:
    """The tensor attention reads is src repeated n_rep times: [B, Hkv*n_rep, S, D] or [B*Hkv*n_rep, S, D]."""
    B, Hkv, S, D = src.shape
    shape = (B, Hkv * n_rep, S, D) if _tensor(node).dim() == 4 else (B * Hkv * n_rep, S, D)
    if not _same_shape(_tensor(node).shape, shape):
        raise NoMatch("kv_shape")


def _kv_source_transposed(kt: fx.Node, B, H, D):
    """kᵀ as the eager bmm reads it, [B*H, D, Sk]: a reshape of transpose(k, -2, -1)."""
    chain = _strip(kt)
    t = chain[-1]
    if _is(t, aten.transpose.int):
        dims = sorted(d % _tensor(t).dim() for d in t.args[1:3])
        ok = dims == [_tensor(t).dim() - 2, _tensor(t).dim() - 1]
    elif _is(t, aten.permute.default):
        perm = [d % 4 for d in t.args[1]]
        ok = perm == [0, 1, 3, 2]
    else:
        ok = False
    if not ok:
        raise NoMatch("eager_k_not_transposed")
    src, n_rep, through, nodes = _kv_source(t.args[0], B, H, D)
    return src, n_rep, through, chain + nodes


def _strip(node: fx.Node) -> list:
    """[node, its input, ...] following value-preserving reshapes and copies back."""
    chain = [node]
    while _is_plain_reshape(node):
        node = node.args[0]
        chain.append(node)
    return chain


def _is_plain_reshape(node) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.args
            and isinstance(node.args[0], fx.Node)):
        return False
    if node.target is aten.clone.default:
        return set(node.kwargs) <= {"memory_format"}
    if node.target is aten.expand.default:  # matmul's expand to the shape it already has
        return _same_shape(_tensor(node).shape, _tensor(node.args[0]).shape)
    return node.target in _RESHAPES


def _find_4d(chain: list, shape: tuple) -> Optional[fx.Node]:
    """The furthest node of a reshape chain whose shape is `shape` (None entries: any size)."""
    for n in reversed(chain):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 4 and \
                all(want is None or _eq(got, want) for got, want in zip(val.shape, shape)):
            return n
    return None


def _copies(chain: list, source: fx.Node) -> list:
    """(clone, source) pairs for the clones between chain[0] and `source`: the rewrite reads
    `source` where the clone read it, so nothing may write it in between (see _rewrite)."""
    upto = chain[:chain.index(source)] if source in chain else chain
    return [(n, source) for n in upto if n.target is aten.clone.default]


# ---------------------------------------------------------------- checks

def _tensor(node) -> torch.Tensor:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise NoMatch("no_tensor_meta")
    return val


def _bhsd(val: torch.Tensor, what: str):
    if val.dim() != 4:
        raise NoMatch(f"{what}_not_4d")
    return tuple(val.shape)


def _check_dtypes(qv, kv, vv) -> None:
    if not (qv.dtype == kv.dtype == vv.dtype) or qv.dtype not in _DTYPES:
        raise NoMatch("dtype")
    if not (qv.device == kv.device == vv.device):
        raise NoMatch("device")
    D, Dk, Dv = qv.shape[3], kv.shape[3], vv.shape[3]
    if not (_eq(D, Dk) and _eq(D, Dv)):
        raise NoMatch("head_dim_mismatch")
    if not (_known(D <= _MAX_HEAD_DIM) and _known(D > 0)):
        raise NoMatch(f"head_dim_{D}_unsupported")
    Hq, Hkv = qv.shape[1], kv.shape[1]
    if not (_eq(Hq, Hkv) or isinstance(Hq, int) and isinstance(Hkv, int) and Hkv > 0 and Hq % Hkv == 0):
        raise NoMatch("heads_mismatch")
    if not _eq(qv.shape[0], kv.shape[0]):
        raise NoMatch("batch_mismatch")


def _check_mask(mask, qv: torch.Tensor, shape: tuple) -> None:
    if not isinstance(mask, fx.Node):
        raise NoMatch("mask_not_tensor")
    mv = _tensor(mask)
    if mv.dtype != torch.bool and mv.dtype != qv.dtype:
        raise NoMatch("mask_dtype")
    if mv.device != qv.device:
        raise NoMatch("device")
    if mv.dim() > 4:
        raise NoMatch("mask_shape")
    for got, want in zip(reversed(mv.shape), reversed(shape)):
        if not (_eq(got, 1) or _eq(got, want)):
            raise NoMatch("mask_shape")


def _check_scale(scale):
    if scale is None:
        return None
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 0:
        raise NoMatch("scale")  # the kernel's fast path needs a non-negative scale
    return float(scale)


class _MaskValues(NamedTuple):
    max_abs: float  # bound on |value|, finite in the node's dtype
    medium: bool    # some value may lie in 16 < |v| < 1e30 (see the module docstring)


_SMALL, _HUGE = 16.0, 1e30


def _classify(abs_values: torch.Tensor) -> Optional[_MaskValues]:
    if abs_values.numel() == 0:
        return _MaskValues(0.0, False)
    if not bool(abs_values.isfinite().all()):
        return None
    a = abs_values.double()
    return _MaskValues(float(a.max()), bool(((a > _SMALL) & (a < _HUGE)).any()))


def _in_dtype(values: Optional[_MaskValues], dtype: torch.dtype) -> Optional[_MaskValues]:
    """The values once stored in `dtype`: None if the largest overflows to inf (fp32's min in bf16,
    bf16's min or any int below -65504 in fp16)."""
    if values is None or not dtype.is_floating_point:
        return values
    stored = torch.tensor(values.max_abs, dtype=torch.float64).to(dtype)
    return values if bool(stored.isfinite()) else None


def _mask_values(gm: fx.GraphModule, node) -> Optional[_MaskValues]:
    """What a mask can hold, when provable from the graph (HF's where(keep, 0, finfo.min) built in
    the graph or folded to a constant): a bound on its magnitude and whether a value may be of
    medium size. None when unknown (a graph input) or when some value may be -inf/NaN."""
    if isinstance(node, bool):
        return _MaskValues(float(node), False)
    if isinstance(node, (int, float)):
        return _classify(torch.tensor([abs(float(node))], dtype=torch.float64))
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = constant_value(gm, node)
        if not isinstance(value, torch.Tensor):
            return None
        return _classify(value.detach().abs().double() if value.dtype != torch.bool else value.double())
    if node.op != "call_function":
        return None
    out_dtype = _tensor(node).dtype
    if node.target in _VIEWS_OF_MASK:
        return _mask_values(gm, node.args[0])
    if node.target in (aten.scalar_tensor.default, aten.full.default):
        fill = node.args[-1] if node.target is aten.full.default else node.args[0]
        return _in_dtype(_mask_values(gm, fill), out_dtype)
    if node.target is aten.where.self:
        a, b = _mask_values(gm, node.args[1]), _mask_values(gm, node.args[2])
        if a is None or b is None:
            return None
        return _in_dtype(_MaskValues(max(a.max_abs, b.max_abs), a.medium or b.medium), out_dtype)
    if cast_dtype(node) is not None:
        return _in_dtype(_mask_values(gm, node.args[0]), out_dtype)
    return None


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _last_dim_keepdim(node: fx.Node) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    ndim = _tensor(node.args[0]).dim()
    return keepdim is True and isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % ndim == ndim - 1


def _eq(a, b) -> bool:
    """a == b proven (ints, or SymInts whose difference the shape environment simplifies to 0);
    never adds a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return _known(a == b)


def _known(cond) -> bool:
    try:
        return bool(statically_known_true(cond))
    except Exception:
        return False


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- the rewrite

def _rewrite(gm: fx.GraphModule, match: _Match, stats: Counter) -> set:
    """Insert the flash_attention node in place of match.anchor; returns the nodes erased."""
    graph, anchor = gm.graph, match.anchor
    order = {n: i for i, n in enumerate(graph.nodes)}
    # Reading a source where its copy (repeat_kv's clone) was read is only the same value if
    # nothing writes the source's storage between the copy and the anchor.
    for copy, source in match.reads_through:
        root = alias_root(source)
        for n in list(graph.nodes)[order[copy]:order[anchor]]:
            if may_write(n) and any(isinstance(a, fx.Node) and alias_root(a) is root for a in n.args):
                raise NoMatch("source_written_before_use")
    args = match.args
    created = []
    try:
        if match.q_op is not None:
            target, factor = match.q_op
            q_scaled = _create(graph, anchor, target, (args[0], factor), created)
            if q_scaled.meta["val"].dtype != args[0].meta["val"].dtype:
                raise NoMatch("eager_scale_promotes_q")
            args = (q_scaled,) + args[1:]
        new = _create(graph, anchor, torch.ops.fusecc.flash_attention.default, args, created)
        if not same_tensor_meta(anchor.meta.get("val"), new.meta["val"]):
            raise NoMatch("output_meta_differs")
    except NoMatch:
        for n in reversed(created):
            graph.erase_node(n)
        raise
    anchor.replace_all_uses_with(new)
    # erase the old computation where it became dead (pure nodes only, users first)
    erased = set()
    for n in sorted(set(match.removed), key=lambda n: -order[n]):
        if not n.users and (n is anchor or is_pure(n)):
            graph.erase_node(n)
            erased.add(n)
    stats["rewritten"] += 1
    stats[f"rewritten:{match.kind}"] += 1
    if match.n_rep > 1:
        stats["repeat_kv_removed"] += 1
    return erased


def _create(graph: fx.Graph, before: fx.Node, target, args: tuple, created: list) -> fx.Node:
    """A new node before `before`, meta['val'] from running `target` on the fake inputs."""
    with graph.inserting_before(before):
        new = graph.call_function(target, args)
    created.append(new)
    new.meta.update({k: v for k, v in before.meta.items() if k in ("stack_trace", "nn_module_stack")})
    try:
        new.meta["val"] = target(*[a.meta["val"] if isinstance(a, fx.Node) else a for a in args])
    except Exception:
        raise NoMatch("fake_eval_failed") from None
    return new
