"""`speculative_config`: what proposes draft tokens and how many, with vLLM's key names.

    SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4}')
    SpeculativeConfig.parse({"model": "path/to/draft", "num_speculative_tokens": 3})
    SpeculativeConfig.parse({"method": "layer_skip", "num_layers": 8, "num_speculative_tokens": 3})
    SpeculativeConfig.parse({"quantization": "int4", "num_speculative_tokens": 3})   # the target's int4 copy

Methods:
- "ngram": prompt lookup over the sequence's own tokens (prompt_lookup_max / prompt_lookup_min:
  the longest n-gram tried first);
- "draft_model" (implied by "model" or "quantization"): a small model with the target's vocabulary, its
  own paged KV; "quantization" ("int8" | "int4" | "fp8", vLLM's key) quantizes the draft at load, and
  without "model" the draft is the target itself quantized (a self-draft for users with one model: its
  linears in int4 read a quarter of the bytes; embeddings, norms and head shared with the target);
- "layer_skip": the target's first num_layers layers and its head (self-draft, shares the target's KV).

disable_by_batch_size: no proposals while more sequences than this decode (default 16; at large
batch the forward is no longer memory-bound and verifying k extra tokens per sequence costs more
than it saves). Bad values: one ValueError naming the key, raised when the engine is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fusecc.quantization.config import ON_THE_FLY, QUANTIZATION_METHODS

METHODS = ("ngram", "draft_model", "layer_skip")
_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model", "num_layers",
         "disable_by_batch_size", "quantization"}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None
    num_layers: int | None = None
    disable_by_batch_size: int = 16
    quantization: str | None = None

    @classmethod
    def parse(cls, value: str | dict) -> "SpeculativeConfig":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        unknown = sorted(set(value) - _KEYS)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known keys: {sorted(_KEYS)}")
        d = dict(value)
        if "method" not in d:
            d["method"] = "draft_model" if d.get("model") or d.get("quantization") else None
        method = d["method"]
        if method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(METHODS)} (or give 'model'), "
                             f"got {method!r}")
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config.num_speculative_tokens is required (the tokens proposed per step)")
        cfg = cls(**d)
        cfg._check()
        return cfg

    def _check(self) -> None:
        def require(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ValueError(f"speculative_config.{key} {what}, got {getattr(self, key)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        require(is_int(self.num_speculative_tokens) and self.num_speculative_tokens >= 1,
                "num_speculative_tokens", "must be an integer >= 1")
        require(is_int(self.disable_by_batch_size) and self.disable_by_batch_size >= 1,
                "disable_by_batch_size", "must be an integer >= 1")
        if self.method == "ngram":
            require(is_int(self.prompt_lookup_min) and self.prompt_lookup_min >= 1, "prompt_lookup_min",
                    "must be an integer >= 1")
            require(is_int(self.prompt_lookup_max) and self.prompt_lookup_max >= self.prompt_lookup_min,
                    "prompt_lookup_max", f"must be an integer >= prompt_lookup_min ({self.prompt_lookup_min})")
        if self.method == "draft_model":
            if self.model is None:
                require(self.quantization in ON_THE_FLY, "quantization",
                        f"must be one of {list(ON_THE_FLY)} for a quantized copy of the target (or give 'model')")
            else:
                require(isinstance(self.model, str) and bool(self.model), "model",
                        "must name the draft model's folder")
                require(self.quantization is None or self.quantization in QUANTIZATION_METHODS, "quantization",
                        f"must be one of {list(QUANTIZATION_METHODS)} or null")
        else:
            for key in ("model", "quantization"):
                if getattr(self, key) is not None:
                    raise ValueError(f"speculative_config.{key} is only for method 'draft_model', got method "
                                     f"{self.method!r}")
        if self.method == "layer_skip":
            require(is_int(self.num_layers) and self.num_layers >= 1, "num_layers", "must be an integer >= 1")
