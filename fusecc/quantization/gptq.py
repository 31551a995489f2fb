"""Offline quantization with GPTQ rounding: a float checkpoint -> a quantized checkpoint fusecc loads
as it loads any other of that format.

    fusecc quantize --model PATH --method fp8 --out DIR        # quant_method "fp8": e4m3, per-channel scales
    fusecc quantize --model PATH --method int4 --out DIR       # quant_method "gptq": 4 bits, group 128, asymmetric
    fusecc quantize --model PATH --method fp8 --rtn --out DIR  # round to nearest (what quantization=... does at load)

Round-to-nearest moves each weight to its nearest grid value on its own. GPTQ (Frantar et al., 2022,
"Accurate Post-Training Quantization for Generative Pre-trained Transformers") rounds a layer's
columns one at a time and spreads each column's rounding error over the columns not yet rounded,
weighted by the inverse Hessian of the layer's inputs (H = 2 X^T X over calibration tokens), so the
layer's outputs on inputs like those move less. Columns go in activation order (largest inputs first,
GPTQ's "desc_act"), while the most columns are left to take up their error.

The grids: fp8 keeps round-to-nearest's per-channel scale (max |w| of the row / 448). int4 fixes each
group's scale and zero point before rounding, from the group's original weights ("static groups"),
so the checkpoint keeps contiguous groups (desc_act false: the layout our kernels and every GPTQ
loader read) however the columns were ordered; the group's range is shrunk by the factor, of a few,
that rounds the group with the least error weighted by its inputs' mean squares (the Hessian's
diagonal). In both, only the values the weights take change: the checkpoint runs on the same kernels
at the same speed. Before int4 rounding each layer's linears also get activation-aware input scales
folded into the modules feeding them (activation_scaling.py: AWQ's idea, searched on the Hessians).

Calibration text: Python standard-library docstrings (fusecc/eval/docstring_corpus.py), windows
after the first `skip_windows` (the ones benchmarks/quant_quality.py scores), so calibration and
evaluation never share text. The Hessians come in GPTQ's true-sequential order: each decoder layer
sees the outputs of the layers before it as already quantized, and within a layer q/k/v are rounded
before o_proj sees their outputs, gate/up before down_proj.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fusecc.quantization.activation_scaling import scale_layer_inputs
from fusecc.quantization.packing import FP8_MAX, fusecc_to_gptq_int4, quantize_fp8

# transformers' decoder linears that fusecc quantizes (fusecc/quantization/model.py's, by HF names), in
# the order a decoder layer's inputs reach them: each group's inputs depend on the groups before it
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
DECODER_LINEARS = tuple(name for group in SEQUENTIAL_GROUPS for name in group)
INT4_RANGE_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
METHODS = ("fp8", "int4")


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in name and name.rpartition(".")[2] in DECODER_LINEARS}


def _accumulate_hessians(linears: dict[str, nn.Linear], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """name -> (2 / tokens) * X^T X (float64 [K, K]) of each linear's inputs while `run()` runs."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            # one window's X^T X in fp32 (a few hundred terms each), summed over windows in fp64
            sums[name] = sums.get(name, 0) + (x.t() @ x).double()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] * (2.0 / counts[name]) for name in sums}


class _LayerInputsCaught(Exception):
    pass


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__}: no decoder layers (model.get_decoder().layers) to quantize in order")
    return layers


@torch.no_grad()
def quantize_sequentially(model: nn.Module, windows: list[list[int]],
                          round_linear: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor],
                          prepare_layer: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None) -> None:
    """GPTQ's true-sequential pass: round every decoder linear with the Hessian of the inputs it sees once
    everything before it is rounded. round_linear(name, weight, hessian) returns the dequantized weight,
    which replaces the linear's weight so the later linears see its outputs. prepare_layer(layer,
    hessians), if given, first sees each layer in float with its linears' input Hessians (names relative
    to the layer) and may change it without changing its float function (activation_scaling.py)."""
    layers = _decoder_layers(model)
    device = next(model.parameters()).device
    # each window's (other positional args, keyword args) per layer type (config.layer_types: the model
    # gives each type its own mask, and Gemma3 its own rotary embedding), caught at the first layer of
    # that type and given to every layer of it; models without layer types have one
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(text_config, "layer_types", None)
    layer_type = (lambda i: types[i]) if types is not None and len(types) >= len(layers) else (lambda i: None)
    first_of_type: dict = {}
    for index in range(len(layers)):
        first_of_type.setdefault(layer_type(index), index)
    last_caught = max(first_of_type.values())
    caught: dict = {kind: [] for kind in first_of_type}  # layer type -> [(args, kwargs)] per window
    hidden: list[torch.Tensor] = []  # each window's hidden states entering the next layer

    def catcher(index: int):
        def catch(module, args, kwargs):
            kwargs = dict(kwargs)
            h = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden.append(h)
            caught[layer_type(index)].append((args[1:], kwargs))
            if index == last_caught:
                raise _LayerInputsCaught
        return catch

    handles = [layers[index].register_forward_pre_hook(catcher(index), with_kwargs=True)
               for index in first_of_type.values()]
    try:
        for window in windows:
            try:
                model(torch.tensor([window], device=device), use_cache=False)
            except _LayerInputsCaught:
                pass
    finally:
        for handle in handles:
            handle.remove()

    def run_layer(index: int) -> list[torch.Tensor]:
        layer = layers[index]
        outputs = []
        for h, (args, kwargs) in zip(hidden, caught[layer_type(index)]):
            out = layer(h, *args, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs

    prefix = next(name for name, m in model.named_modules() if m is layers)
    for index, layer in enumerate(layers):
        linears = {name: m for name, m in layer.named_modules()
                   if isinstance(m, nn.Linear) and name.rpartition(".")[2] in DECODER_LINEARS}
        if prepare_layer is not None:
            prepare_layer(layer, _accumulate_hessians(linears, lambda: run_layer(index)))
        for group in SEQUENTIAL_GROUPS:
            members = {name: m for name, m in linears.items() if name.rpartition(".")[2] in group}
            if not members:
                continue
            hessians = _accumulate_hessians(members, lambda: run_layer(index))
            for name, linear in members.items():
                if name not in hessians:
                    raise ValueError(f"{prefix}.{index}.{name} saw no input in the decoder layer's forward; "
                                     "cannot quantize it in order")
                rounded = round_linear(f"{prefix}.{index}.{name}", linear.weight.data, hessians[name])
                linear.weight.data = rounded.to(linear.weight.dtype)
        hidden = run_layer(index)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, round_column: Callable[[int, torch.Tensor], torch.Tensor],
          block: int, damp: float, act_order: bool) -> None:
    """The GPTQ loop over the columns of weight [N, K]: round_column(k, w) rounds original column k (its
    current float64 values w [N]) and returns the dequantized values; the error goes to the later columns."""
    N, K = weight.shape
    order = torch.argsort(torch.diag(hessian), descending=True) if act_order else torch.arange(K)
    W = weight.double()[:, order].clone()
    H = hessian.double()[order][:, order].clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype, device=H.device)
    # the upper Cholesky factor of H^-1: row i holds how column i's error moves the later columns
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, E1, Hi = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1, dtype=W.dtype, device=W.device), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            err = (W1[:, i] - round_column(int(order[i1 + i]), W1[:, i])) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


@torch.no_grad()
def gptq_fp8(weight: torch.Tensor, hessian: torch.Tensor | None, block: int = 128,
             damp: float = 0.01, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (float8_e4m3fn [N, K], scale fp32 [N]); hessian None: round to nearest, as
    quantization="fp8" does at load (packing.quantize_fp8). With one scale per output channel the
    column order leaves no trace in the checkpoint."""
    q, rtn_scale = quantize_fp8(weight)
    if hessian is None:
        return q, rtn_scale[:, 0]
    scale = rtn_scale[:, 0].double()  # round-to-nearest's per-channel scale, as stored

    def round_column(k: int, w: torch.Tensor) -> torch.Tensor:
        q[:, k] = _e4m3(w / scale)
        return q[:, k].double() * scale

    _gptq(weight, hessian, round_column, block, damp, act_order)
    return q, scale.float()


def int4_group_grid(weight: torch.Tensor, group_size: int, importance: torch.Tensor | None = None,
                    shrinks: tuple[float, ...] = INT4_RANGE_SHRINKS) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (scales, zeros) fp32 [N, ceil(K/G)]: quantize_int4's grid (the group's range with 0 in
    it onto 0..15, integer zero point) with the range shrunk by the factor in `shrinks` whose round to
    nearest leaves the least squared error, each column weighted by importance [K] (None: equally).
    shrinks=(1.0,) is quantize_int4's grid."""
    N, K = weight.shape
    groups = -(-K // group_size)
    w = weight.float()  # quantize_int4's arithmetic, so shrinks=(1.0,) gives its grid bit for bit
    weights = torch.ones(K, dtype=w.dtype, device=w.device) if importance is None else importance.float()
    if groups * group_size != K:  # the short last group padded with its last column at zero weight
        w = torch.cat([w, w[:, -1:].expand(N, groups * group_size - K)], dim=1)
        weights = torch.cat([weights, weights.new_zeros(groups * group_size - K)])
    wg = w.view(N, groups, group_size)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    best_error = best_scales = best_zeros = None
    for shrink in shrinks:
        scales = ((hi - lo) * shrink / 15).clamp(min=1e-12)
        zeros = (-lo * shrink / scales).round().clamp(0, 15)
        q = (wg / scales[..., None] + zeros[..., None]).round().clamp(0, 15)
        error = (((q - zeros[..., None]) * scales[..., None] - wg) ** 2 * weights.view(1, groups, group_size)).sum(-1)
        if best_error is None:
            best_error, best_scales, best_zeros = error, scales, zeros
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scales = torch.where(better, scales, best_scales)
            best_zeros = torch.where(better, zeros, best_zeros)
    return best_scales, best_zeros


@torch.no_grad()
def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor | None, group_size: int = 128, block: int = 128,
              damp: float = 0.01, act_order: bool = True,
              scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q uint8 [N, K] in 0..15, scales fp32, zeros fp32 [N, ceil(K/G)]), w ~ (q - z) * s.
    hessian None: round to nearest on quantize_int4's grid (what quantization="int4" does at load).
    The scales are rounded to scale_dtype first (a GPTQ checkpoint stores them in fp16), so the values
    GPTQ rounds against are the ones that load."""
    N, K = weight.shape
    importance = None if hessian is None else torch.diag(hessian)
    scales, zeros = int4_group_grid(weight, group_size, importance, INT4_RANGE_SHRINKS if hessian is not None
                                    else (1.0,))
    scales = scales.to(scale_dtype).float()
    g = torch.arange(K, device=weight.device) // group_size
    s, z = scales[:, g].double(), zeros[:, g].double()  # [N, K]: each column's group's
    q = torch.empty(N, K, dtype=torch.uint8, device=weight.device)

    def round_column(k: int, w: torch.Tensor) -> torch.Tensor:
        qk = (w / s[:, k] + z[:, k]).round().clamp(0, 15)
        q[:, k] = qk.to(torch.uint8)
        return (qk - z[:, k]) * s[:, k]

    if hessian is None:
        q = (weight.double() / s + z).round().clamp(0, 15).to(torch.uint8)
    else:
        _gptq(weight, hessian, round_column, block, damp, act_order)
    return q, scales, zeros


def calibration_windows(tokenizer, count: int, window_len: int, skip_windows: int) -> list[list[int]]:
    from fusecc.eval.docstring_corpus import token_windows

    windows = token_windows(tokenizer, window_len=window_len, max_windows=skip_windows + count)
    if len(windows) <= skip_windows:
        raise ValueError(f"the docstring corpus has only {len(windows)} windows of {window_len} tokens; none is left "
                         f"after skipping {skip_windows}")
    return windows[skip_windows:]


def _quantization_config(method: str, group_size: int) -> dict:
    if method == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"}
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": False,
            "checkpoint_format": "gptq_v2"}


def quantize_checkpoint(model_path: str, out_dir: str, *, method: str = "fp8", gptq: bool = True,
                        calibration: int = 128, window_len: int = 512, skip_windows: int = 32,
                        group_size: int = 128, device: str = "cpu") -> dict:
    """Write `model_path` (a checkpoint folder or a GGUF file) to `out_dir` as an fp8 checkpoint
    (method "fp8") or a GPTQ int4 one (method "int4"); returns what was done (linears, calibration tokens)."""
    from fusecc.eval.perplexity import load_transformers_model
    from fusecc.runtime.loader import load_tokenizer

    if method not in METHODS:
        raise ValueError(f"quantize method {method!r} is not one of {', '.join(METHODS)}")
    model = load_transformers_model(model_path, torch.float32, device)
    tokenizer = load_tokenizer(model_path)
    linears = decoder_linears(model)
    if not linears:
        raise ValueError(f"{model_path}: no decoder linears named {', '.join(DECODER_LINEARS)} to quantize")
    stored: dict[str, dict[str, torch.Tensor]] = {}

    def round_linear(name: str, weight: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
        if method == "fp8":
            q, scale = gptq_fp8(weight, hessian)
            stored[name] = {"weight": q, "weight_scale": scale}
            return q.float() * scale[:, None]
        q, scales, zeros = gptq_int4(weight, hessian, group_size)
        qweight, qzeros, scales16 = fusecc_to_gptq_int4(q, scales, zeros)
        K = weight.shape[1]
        g = torch.arange(K, device=weight.device) // group_size
        stored[name] = {"qweight": qweight, "qzeros": qzeros, "scales": scales16, "g_idx": g.to(torch.int32)}
        return (q.float() - zeros[:, g]) * scales[:, g]

    windows = calibration_windows(tokenizer, calibration, window_len, skip_windows) if gptq else []
    alphas: list[float] = []  # one per group of linears whose inputs were scaled

    def scale_inputs(layer: nn.Module, hessians: dict[str, torch.Tensor]) -> None:
        alphas.extend(scale_layer_inputs(layer, hessians, group_size).values())

    if gptq:
        quantize_sequentially(model, windows, round_linear, scale_inputs if method == "int4" else None)
    else:
        for name, linear in linears.items():
            round_linear(name, linear.weight.data, None)
    model.to(torch.bfloat16)  # the tensors left in float: embeddings, norms, head
    # written by hand: transformers will not save a model it loaded from a GGUF file
    state = {name: t.contiguous().cpu() for name, t in model.state_dict().items()
             if name.rpartition(".")[0] not in stored or not name.endswith(".weight")}
    for name, tensors in stored.items():
        state.update({f"{name}.{key}": t.contiguous().cpu() for key, t in tensors.items()})
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embedding's (a shared tensor safetensors refuses)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = config.get("architectures") or [type(model).__name__]  # a GGUF's config has none
    config.update(dtype="bfloat16", quantization_config=_quantization_config(method, group_size))
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)
    return {"linears": len(stored), "method": method, "rounding": "gptq" if gptq else "nearest",
            "calibration_tokens": sum(len(w) for w in windows), "activation_scaled_groups": len(alphas)}
