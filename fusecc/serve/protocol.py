"""Request and response bodies of the OpenAI API subset fusecc-serve speaks.

    req = CompletionRequest.model_validate_json(body)   # strict: "5" is not an int, 1 is a float
    ChatCompletionResponse(id=..., model=..., choices=[...], usage=Usage(...)).model_dump(exclude_none=True)

Requests are validated strictly (wrong JSON types are 400s naming the field, not coerced). Unknown
fields are kept in `model_extra`: fusecc/serve/unsupported.py refuses those that would change the
output and logs the others as ignored. An explicit `null` is the same as leaving the field out, as
in the OpenAI API (its SDK sends `null` for a parameter passed as None), so `model_fields_set`
holds exactly the fields the client set (generation_config defaults apply to the others).
Range checks live in SamplingParams (fusecc/runtime/sampling_params.py), mapped to 400s as well.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Token-id prompts: one list of ids, or a batch of them. Strings: one, or a batch.
Prompt = str | list[str] | list[int] | list[list[int]]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        # a required field sent as null is then reported missing, naming it
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """The fields completions and chat share; names and meanings as in vLLM's OpenAI server."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # sample only these token ids / never generate these strings' tokenizations
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # keep only the last k prompt tokens (vLLM's; the engine truncates)
    truncate_prompt_tokens: int | None = None
    # vLLM's: log-probabilities of the prompt tokens with this many alternatives each (not with
    # stream, unless 0: then none are returned, as vLLM)
    prompt_logprobs: int | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # token id (as a string: JSON object keys) -> bias in [-100, 100]
    logit_bias: dict[str, float] | None = None
    # Known to change the output but not implemented: refused unless absent or neutral
    # (fusecc/serve/unsupported.py), never silently ignored.
    best_of: int | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    # Completions API: the number of top alternatives per token (0 = only the sampled token's).
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None  # insertion (fill-in-the-middle): not supported, refused when non-empty


class ContentPart(_Request):
    # "text", or "image_url", "input_audio", "file", ...: the server refuses the others by name
    # (a text-only model), rather than as a schema mismatch.
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def non_text_part(self) -> int | None:
        """Index of the first content part that is not text, if any."""
        if isinstance(self.content, list):
            return next((i for i, p in enumerate(self.content) if p.type != "text"), None)
        return None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    # Chat API: logprobs is a switch and top_logprobs the number of alternatives.
    logprobs: bool = False
    top_logprobs: int | None = None
    # The newer name of max_tokens; wins when both are set.
    max_completion_tokens: int | None = None
    # vLLM's: end the prompt with the template's assistant header (off: the model continues the
    # conversation's last turn as the template renders it).
    add_generation_prompt: bool = True


# ---- responses -------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob as its server writes it (prompt_logprobs entries)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# per prompt token: None for the first, then {token id: PromptLogprob} (JSON object keys: the ids as strings)
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when the request set prompt_logprobs


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when the request set prompt_logprobs


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fusecc"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
