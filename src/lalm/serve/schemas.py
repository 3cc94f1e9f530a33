"""OpenAI request shapes, their validation, and OpenAI's error JSON.

Validation is strict (`"max_tokens": "5"` is refused, as OpenAI does) and every problem
becomes an `APIError` whose `param` names the offending field the way a user would write
it (`messages[0].content[1].input_audio.data`), so the client sees a 4xx it can act on
instead of a 500 from deep inside the model.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# OpenAI's `type` for each status: clients (the openai package) key their exception class
# on the status, and humans read `message`.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error the server answers with OpenAI's JSON: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


class _Strict(BaseModel):
    # strict: no "5" -> 5 or 1 -> True coercion; extra keys are ignored as many OpenAI
    # clients send fields (user, metadata, ...) that do not change what we compute.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class InputAudio(_Strict):
    data: str = Field(description="base64 of the file's bytes")
    format: Literal["wav", "mp3", "flac", "ogg"]


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURL(_Strict):
    url: str


class AudioURLPart(_Strict):
    type: Literal["audio_url"]
    audio_url: AudioURL


Part = Annotated[TextPart | InputAudioPart | AudioURLPart, Field(discriminator="type")]


class Message(_Strict):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


def _nulls_as_absent(data: Any, keys: tuple[str, ...]) -> Any:
    # OpenAI's API takes null for these (`"n": null` is n=1), and clients that forward their
    # unset options send exactly that: read it as "not sent", not as a wrong type.
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if not (v is None and k in keys)}
    return data


class StreamOptions(_Strict):
    include_usage: bool = False

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _nulls_as_absent(data, ("include_usage",))


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch's seeding takes
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # vLLM's sampling extras (the OpenAI SDK sends them in extra_body), with vLLM's meanings:
    # top_k -1 or 0 = off; repetition_penalty on prompt and output tokens, 1 = off; min_tokens
    # before a stop token may end the answer. None: the checkpoint's generation_config.
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    min_tokens: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _nulls_as_absent(data, ("stream", "n", "logprobs"))

    @model_validator(mode="after")
    def _check(self) -> ChatRequest:
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop: at most 4 stop sequences")
        if self.stop is not None and any(s == "" for s in self.stop_list()):
            raise ValueError("stop: stop sequences must not be empty")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs=true")
        wanted = self.max_new_tokens()
        if self.min_tokens and wanted is not None and self.min_tokens > wanted:
            raise ValueError(f"min_tokens: {self.min_tokens} is more than max_tokens ({wanted})")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def max_new_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name; it wins when both are sent.
        return self.max_completion_tokens or self.max_tokens


def _param(loc: tuple) -> str:
    """('messages', 0, 'content', 'list[...]', 1, 'text', 'text') -> 'messages[0].content[1].text'."""
    out = ""
    prev = None
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif "[" in item or item in ("str", "int", "float", "bool", "none", "list"):
            continue  # pydantic's label for a union branch, not a field the user wrote
        elif isinstance(prev, int) and item in ("text", "input_audio", "audio_url"):
            pass  # the tagged union's label for a content part
        else:
            out += f".{item}" if out else item
        prev = item
    return out


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors(include_url=False)
    # Union branches each report an error; the deepest one is where the user went wrong
    # (a bad field inside a part beats "content is not a string").
    depth = max(len([x for x in err["loc"]]) for err in errors)
    deepest = [err for err in errors if len(err["loc"]) == depth]
    param = _param(tuple(deepest[0]["loc"]))
    if not param:  # a model-level check: its message starts with the field's name
        m = re.match(r"(?:Value error, )?(\w+): ", deepest[0]["msg"])
        param = m.group(1) if m else ""
    msgs = []
    for err in deepest:
        msg = err["msg"].removeprefix("Value error, ")
        if msg not in msgs:
            msgs.append(msg)
    text = " or ".join(msgs)
    message = f"{param}: {text}" if param and not text.startswith(param) else text
    return APIError(400, message, param=param or None, code="invalid_value")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(
            400,
            f"We could not parse the JSON body of your request ({e}). The body must be JSON.",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise APIError(400, "The JSON body is nested too deeply.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The JSON body must be an object.", code="invalid_json")
    _check_strings(body)
    return body


def _check_strings(body: Any) -> None:
    """Refuse lone surrogates (`"\\ud800"`): valid JSON, but not text any tokenizer can encode."""
    stack = [body]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
            stack.extend(x.keys())
        elif isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, str) and not x.isascii():
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(
                    400,
                    f"The JSON body contains a lone surrogate escape in {x[:40]!r}; "
                    "strings must be valid Unicode.",
                    code="invalid_json",
                ) from None


# Fields OpenAI or vLLM accept that change the answer and that this server cannot honour,
# with the values that ask for nothing (what clients forwarding their defaults send).
# Anything else is a 400 naming the field: dropping it, as unknown keys are, would return
# free text where JSON, a tool call, a penalty or audio output was asked for.
_NEUTRAL: dict[str, tuple] = {
    "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),  # spoken output
    # vLLM's own sampling and structured-output fields (top_k, repetition_penalty and
    # min_tokens are honoured: ChatRequest)
    "min_p": (None, 0),
    "ignore_eos": (None, False),
    "use_beam_search": (None, False),
    "best_of": (None, 1),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
}


def _refuse_unsupported(body: dict[str, Any]) -> None:
    def refuse(name: str, why: str) -> None:
        raise APIError(400, f"{name}: {why}", name, "unsupported_parameter")

    for tools, choice in (("tools", "tool_choice"), ("functions", "function_call")):
        # tool_choice "none" asks for plain text even with tools listed: that we can do.
        if body.get(tools) and body.get(choice) != "none":
            refuse(tools, "tool calling is not supported by this server (leave out "
                   f"{tools}, or send {choice}='none')")
        if body.get(choice) not in (None, "none", "auto"):
            refuse(choice, "tool calling is not supported by this server")
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if not any(_same(value, v) for v in neutral):
            refuse(name, f"{value!r} is not supported by this server"
                   + (" (only {'type': 'text'})" if name == "response_format" else ""))


def _same(value: Any, neutral: Any) -> bool:
    # `is` for None and bools, and no bool for a number: True == 1 and False == 0 in Python.
    if neutral is None or isinstance(neutral, bool):
        return value is neutral
    return value == neutral and not isinstance(value, bool)


def parse_chat_request(raw: bytes) -> ChatRequest:
    body = parse_json_body(raw)
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    _refuse_unsupported(body)
    return req


TranscriptionFormat = Literal["json", "text"]
