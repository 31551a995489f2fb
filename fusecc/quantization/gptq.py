"""Offline fp8 quantization with GPTQ rounding: a float checkpoint -> an fp8 checkpoint (`quant_method:
"fp8"`, e4m3 weights with per-output-channel `weight_scale`, dynamic per-token activations) that
fusecc loads as it loads any fp8 checkpoint.

    fusecc quantize --model PATH --method fp8 --out DIR        # GPTQ rounding, docstring calibration
    fusecc quantize --model PATH --method fp8 --rtn --out DIR  # round to nearest (what quantization="fp8" does at load)

Round-to-nearest moves each weight to its nearest e4m3 value on its own. GPTQ (Frantar et al., 2022,
"Accurate Post-Training Quantization for Generative Pre-trained Transformers") rounds a layer's
columns one at a time and spreads each column's rounding error over the columns not yet rounded,
weighted by the inverse Hessian of the layer's inputs (H = 2 X^T X over calibration tokens), so the
layer's outputs on inputs like those move less. The per-channel scale is round-to-nearest's (max |w|
of the row / 448); only which e4m3 value each weight takes changes, so the checkpoint runs on the
same kernels at the same speed. On SmolLM2-135M the rounding, not the activations, is most of fp8's
perplexity cost (benchmarks/results/quant_quality.json: variant fp8_gptq against fp8).

Calibration text: Python standard-library docstrings (fusecc/eval/docstring_corpus.py), windows
after the first `skip_windows` (the ones benchmarks/quant_quality.py scores), so calibration and
evaluation never share text. The Hessians come from one pass of the float model (every layer sees
float inputs), which is enough here; the sequential variant is not implemented.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fusecc.quantization.packing import FP8_MAX, quantize_fp8

# transformers' decoder linears that fusecc quantizes (fusecc/quantization/model.py's, by HF names)
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in name and name.rpartition(".")[2] in DECODER_LINEARS}


@torch.no_grad()
def input_hessians(model: nn.Module, linears: dict[str, nn.Linear], windows: list[list[int]]) -> dict:
    """name -> (2 / tokens) * X^T X (float64 [K, K]) of each linear's inputs over the calibration windows."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        device = next(model.parameters()).device
        for window in windows:
            model(torch.tensor([window], device=device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] * (2.0 / counts[name]) for name in sums}


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


@torch.no_grad()
def gptq_fp8(weight: torch.Tensor, hessian: torch.Tensor | None, block: int = 128,
             damp: float = 0.01, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (float8_e4m3fn [N, K], scale fp32 [N]); hessian None: round to nearest, as
    quantization="fp8" does at load (packing.quantize_fp8). act_order: round the columns of the
    largest inputs first (GPTQ's "desc_act"), while the most columns are left to take up their
    error; with one scale per output channel the order leaves no trace in the checkpoint."""
    q, rtn_scale = quantize_fp8(weight)
    if hessian is None:
        return q, rtn_scale[:, 0]
    if act_order:
        order = torch.argsort(torch.diag(hessian), descending=True)
        q, scale = gptq_fp8(weight[:, order], hessian[order][:, order], block, damp, act_order=False)
        return q[:, torch.argsort(order)], scale
    W = weight.double().clone()
    N, K = W.shape
    scale = rtn_scale[:, 0].double()  # round-to-nearest's per-channel scale, as stored
    H = hessian.clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype, device=H.device)
    # the upper Cholesky factor of H^-1: row i holds how column i's error moves the later columns
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.empty(N, K, dtype=torch.float8_e4m3fn, device=W.device)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, E1, Hi = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1, dtype=W.dtype, device=W.device), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = _e4m3(W1[:, i] / scale)
            Q[:, i1 + i] = q
            err = (W1[:, i] - q.double() * scale) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return Q, scale.float()


def calibration_windows(tokenizer, count: int, window_len: int, skip_windows: int) -> list[list[int]]:
    from fusecc.eval.docstring_corpus import token_windows

    windows = token_windows(tokenizer, window_len=window_len, max_windows=skip_windows + count)
    if len(windows) <= skip_windows:
        raise ValueError(f"the docstring corpus has only {len(windows)} windows of {window_len} tokens; none is left "
                         f"after skipping {skip_windows}")
    return windows[skip_windows:]


def quantize_fp8_checkpoint(model_path: str, out_dir: str, *, gptq: bool = True, calibration: int = 16,
                            window_len: int = 512, skip_windows: int = 32, device: str = "cpu") -> dict:
    """Write `model_path` (a checkpoint folder or a GGUF file) to `out_dir` as an fp8 checkpoint; returns
    what was done (linears, calibration tokens)."""
    from fusecc.eval.perplexity import load_transformers_model
    from fusecc.runtime.loader import load_tokenizer

    model = load_transformers_model(model_path, torch.float32, device)
    tokenizer = load_tokenizer(model_path)
    linears = decoder_linears(model)
    if not linears:
        raise ValueError(f"{model_path}: no decoder linears named {', '.join(DECODER_LINEARS)} to quantize")
    windows = calibration_windows(tokenizer, calibration, window_len, skip_windows) if gptq else []
    hessians = input_hessians(model, linears, windows) if gptq else {}
    quantized = {name: gptq_fp8(linear.weight, hessians.get(name)) for name, linear in linears.items()}
    model.to(torch.bfloat16)  # the tensors left in float (embeddings, norms, head); before the fp8 weights go
    for name, (q, scale) in quantized.items():  # in: Module.to(dtype) would cast them too
        linears[name].weight = nn.Parameter(q, requires_grad=False)
        linears[name].weight_scale = nn.Parameter(scale, requires_grad=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # written by hand: transformers will not save a model it loaded from a GGUF file
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embedding's (a shared tensor safetensors refuses)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = config.get("architectures") or [type(model).__name__]  # a GGUF's config has none
    config.update(dtype="bfloat16", quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic",
                                                         "fmt": "e4m3"})
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)
    return {"linears": len(linears), "rounding": "gptq" if gptq else "nearest",
            "calibration_tokens": sum(len(w) for w in windows)}
