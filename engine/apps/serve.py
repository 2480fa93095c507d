"""`zerotrain serve`: an OpenAI-compatible HTTP server for a trained model (FastAPI + uvicorn).

    GET  /v1/models             the one model served
    POST /v1/chat/completions   messages -> the chat template with the assistant's generation prompt
    POST /v1/completions        a raw text prompt

Both POSTs stream with `stream: true` (server-sent events of OpenAI's chunk objects, then
`data: [DONE]`). A chat completion that opens with a `<think>` block (a reasoning model's) is
answered as vLLM's reasoning parsers answer it: the block's text as `reasoning_content`, the rest
as `content`; `chat_template_kwargs` (vLLM's field, e.g. {"enable_thinking": false}) reach the
chat template. Decoding is transformers' `model.generate`, configured as `zerotrain generate`
does (engine.apps.generate). The model answers one request at a time: each generation runs in a
worker thread holding a lock, so the event loop stays free and concurrent requests queue instead
of sharing the model's state or the global RNG that `seed` sets.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import (
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    set_seed,
)

from common.errors import ZerotrainError
from engine.apps.generate import (
    Messages,
    context_length,
    encode_prompt,
    generation_config,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
GRACEFUL_SHUTDOWN_S = 5  # how long SIGTERM waits for responses in flight before cancelling them


# --------------------------------------------------------------------------- requests

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    reasoning_content: str | None = None  # an earlier reply's reasoning, as this server returns it

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, str]:
        out = {"role": self.role, "content": self.text()}
        if self.role == "assistant" and self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        return out


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """The fields both endpoints honour; others (logprobs, penalties, tools, ...) are ignored."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: int | None = None
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens
    chat_template_kwargs: dict[str, Any] | None = None  # variables for the template, e.g. enable_thinking


class CompletionRequest(_Request):
    prompt: str


class RequestError(Exception):
    """A request the server will not run: answered 400 with OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# --------------------------------------------------------------------------- reasoning

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str, opened: bool = False, final: bool = True) -> tuple[str | None, str]:
    """(reasoning_content, content) of a chat completion, as vLLM's DeepSeek-R1 / Qwen3 reasoning
    parsers split it: the text between a leading `<think>` (or from the start, when the prompt
    `opened` the block itself) and `</think>`, without the newlines around it, then the rest, without
    the newlines that follow `</think>` (the template puts one there). reasoning_content is None when
    there is no such block; a block that never closes (the completion ran out of tokens) is all
    reasoning.

    With `final` false, `text` is what a stream has so far, and only what later text cannot change
    is given: each result is a prefix of what any longer text gives, so a stream can send the
    difference (ReasoningStream)."""
    if not opened:
        if not text.startswith(THINK_OPEN):
            if not final and THINK_OPEN.startswith(text):
                return None, ""  # may yet become "<think>"
            return None, text
        text = text[len(THINK_OPEN):]
    end = text.find(THINK_CLOSE)
    if end >= 0:
        content = text[end + len(THINK_CLOSE):].lstrip("\n")
        return text[:end].strip("\n"), content
    if not final:
        # A tail that may begin "</think>" waits, and trailing newlines wait for the text after them.
        text = text[:len(text) - held_back(text, [THINK_CLOSE])]
    return text.strip("\n"), ""


class ReasoningStream:
    """A streamed chat completion's text as reasoning_content and content deltas (split_reasoning)."""

    def __init__(self, opened: bool = False):
        self.opened, self.text = opened, ""
        self.sent_reasoning = self.sent_content = 0

    def feed(self, piece: str, final: bool = False) -> list[dict[str, str]]:
        """The deltas (`{"reasoning_content": ...}`, then `{"content": ...}`) that `piece` releases."""
        self.text += piece
        reasoning, content = split_reasoning(self.text, self.opened, final)
        deltas = []
        if reasoning is not None and len(reasoning) > self.sent_reasoning:
            deltas.append({"reasoning_content": reasoning[self.sent_reasoning:]})
            self.sent_reasoning = len(reasoning)
        if len(content) > self.sent_content:
            deltas.append({"content": content[self.sent_content:]})
            self.sent_content = len(content)
        return deltas


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered chat prompt ends inside a think block, as DeepSeek-R1's template's
    generation prompt does: the completion then starts with reasoning, without `<think>`."""
    return prompt.rstrip().endswith(THINK_OPEN)


# --------------------------------------------------------------------------- generation

@dataclass
class Job:
    """One request's prompt and decoding settings, checked against the model."""

    ids: torch.Tensor  # (1, prompt_tokens)
    max_tokens: int
    config: Any  # transformers.GenerationConfig
    stop: list[str]
    seed: int | None


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class _Cancelled(StoppingCriteria):
    """Stops a generation nobody waits for any more (client gone, server shutting down)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop sequence (which OpenAI leaves out), and whether there was one."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def held_back(text: str, stop: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop sequence: a stream
    holds them until the next tokens show whether they are."""
    return max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


class Generator:
    """The model, its tokenizer and the lock that lets one generation run at a time."""

    def __init__(self, model: torch.nn.Module, tokenizer, model_name: str):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        context = context_length(model)
        if context is None:
            raise ZerotrainError(f"model '{model_name}': its config gives no context length (max_position_embeddings "
                                 "or n_positions); serve needs it to cap max_tokens. Add it to the model's config.json")
        self.context: int = context
        self.lock = threading.Lock()

    def chat_prompt(self, messages: Messages, template_kwargs: dict[str, Any] | None) -> str:
        """`messages` rendered with the chat template and the assistant's generation prompt, with
        `template_kwargs` as template variables (a RequestError for one of apply_chat_template's own
        arguments, which would change what it returns rather than what the template renders)."""
        template_kwargs = template_kwargs or {}
        own = {name for name, p in inspect.signature(self.tokenizer.apply_chat_template).parameters.items()
               if p.kind is not p.VAR_KEYWORD} | {"messages"}
        clash = sorted(own & set(template_kwargs))
        if clash:
            raise RequestError(f"chat_template_kwargs: {', '.join(clash)} cannot be set there (the server renders "
                               "the prompt itself); send template variables only, such as enable_thinking",
                               "chat_template_kwargs")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **template_kwargs)

    def job(self, prompt: str | Messages, request: _Request, max_tokens: int | None, default_max_tokens: int | None,
            param: str) -> Job:
        """Encode `prompt` and check the request against the model (RequestError if it does not fit)."""
        if request.model is not None and request.model != self.model_name:
            raise RequestError(f"model '{request.model}' is not served here; this server serves "
                               f"'{self.model_name}' (GET /v1/models)", "model")
        if (request.n or 1) != 1:
            raise RequestError(f"n={request.n}: this server returns one choice per request; send n=1 "
                               f"(or {request.n} requests, with seeds)", "n")
        ids = encode_prompt(self.tokenizer, prompt, self.model.device)
        prompt_tokens = ids.shape[1]
        if prompt_tokens == 0:
            raise RequestError("the prompt is empty; send at least one token of text", param)
        room = self.context - prompt_tokens
        if room < 1:
            raise RequestError(f"the prompt is {prompt_tokens} tokens, but the model's context is {self.context} "
                               "tokens and must leave room for at least one new token; shorten the prompt", param)
        # A max_tokens past the context is capped (finish_reason "length" says it was cut short).
        max_tokens = min(max_tokens or default_max_tokens or room, room)
        temperature = 1.0 if request.temperature is None else request.temperature
        config = generation_config(self.tokenizer, max_new_tokens=max_tokens, temperature=temperature,
                                   top_p=1.0 if request.top_p is None else request.top_p)
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        # generate stops as soon as a stop sequence appears; the text is then cut before it.
        config.stop_strings = stop or None
        return Job(ids, max_tokens, config, stop, request.seed)

    def run(self, job: Job, cancel: threading.Event, streamer: TextIteratorStreamer | None = None) -> Result:
        """Generate for `job` (blocking; call it from a worker thread)."""
        with self.lock:
            if job.seed is not None:
                set_seed(job.seed)
            out = self.model.generate(input_ids=job.ids, attention_mask=torch.ones_like(job.ids),
                                      generation_config=job.config, streamer=streamer, tokenizer=self.tokenizer,
                                      stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
        new = out[0, job.ids.shape[1]:]
        text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), job.stop)
        ended = len(new) > 0 and int(new[-1]) == self.tokenizer.eos_token_id
        return Result(text, job.ids.shape[1], len(new), "stop" if stopped or ended else "length")

    async def complete(self, job: Job) -> Result:
        """The whole completion, generated in a worker thread."""
        cancel = threading.Event()
        try:
            return await anyio.to_thread.run_sync(self.run, job, cancel, abandon_on_cancel=True)
        finally:
            cancel.set()  # a cancelled request (server shutting down) stops its generation at the next token

    async def stream(self, job: Job) -> AsyncIterator[str | Result]:
        """The completion's text in pieces as it is generated, then its Result. The pieces add up to
        Result.text: text that may begin a stop sequence is held back until it is known not to."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel, outcome = threading.Event(), {}

        def produce() -> None:
            try:
                outcome["result"] = self.run(job, cancel, streamer)
            except Exception as e:  # handed to the response; end() lets it stop waiting for text
                outcome["error"] = e
                streamer.end()

        producer = threading.Thread(target=produce, name="zerotrain-generate", daemon=True)
        producer.start()
        text, sent = "", 0
        try:
            while (piece := await anyio.to_thread.run_sync(next, streamer, None, abandon_on_cancel=True)) is not None:
                text += piece
                text, stopped = cut_at_stop(text, job.stop)
                ready = len(text) if stopped else len(text) - held_back(text, job.stop)
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
                if stopped:
                    break
        finally:
            cancel.set()  # a stop sequence was reached or the client went away: no more tokens needed
        await anyio.to_thread.run_sync(producer.join)
        if "error" in outcome:
            raise outcome["error"]
        result: Result = outcome["result"]
        if len(result.text) > sent:  # the held-back tail that turned out not to be a stop sequence
            yield result.text[sent:]
        yield result


# --------------------------------------------------------------------------- the app

def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _respond(generator: Generator, request: _Request, job: Job, *, chat: bool, opened: bool = False):
    """The completion as one JSON object (chat.completion or text_completion), or with `stream` as
    server-sent events of OpenAI's chunks, a chat stream opening with the assistant's role. A chat
    completion's think block goes to reasoning_content (split_reasoning; `opened`: the prompt opened it)."""
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": generator.model_name}
    if not request.stream:
        result = await generator.complete(job)
        if chat:
            reasoning, text = split_reasoning(result.text, opened)
            message = {"role": "assistant", "content": text}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            content = {"message": message}
        else:
            content = {"text": result.text}
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": result.finish_reason}
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": result.usage()}

    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    include_usage = request.stream_options is not None and request.stream_options.include_usage

    def chunk(content: dict[str, Any], finish_reason: str | None = None) -> str:
        return _sse({**head, "choices": [{"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}]})

    reasoning = ReasoningStream(opened)

    def contents(piece: str, final: bool = False) -> list[dict[str, Any]]:
        """A chat stream's text as reasoning_content and content deltas, a completion's as it is."""
        if chat:
            return [{"delta": delta} for delta in reasoning.feed(piece, final)]
        return [{"text": piece}] if piece else []

    async def events() -> AsyncIterator[str]:
        if chat:
            yield chunk({"delta": {"role": "assistant", "content": ""}})
        try:
            async for item in generator.stream(job):
                final = isinstance(item, Result)  # the text held back is released with it
                for content in contents("" if final else item, final):
                    yield chunk(content)
                if final:
                    yield chunk({"delta": {}} if chat else {"text": ""}, item.finish_reason)
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": item.usage()})
        except Exception as e:  # the 200 and earlier chunks are already sent: report it in the stream
            logging.getLogger("uvicorn.error").exception("generation failed")
            yield _sse(error_body(f"{type(e).__name__}: {e}", kind="server_error"))
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def create_app(generator: Generator) -> FastAPI:
    """The FastAPI app serving `generator`'s model under /v1."""
    created = int(time.time())
    app = FastAPI(title="zerotrain")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.param), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first["type"] == "json_invalid":  # its loc is a character position, not a field
            reason = first.get("ctx", {}).get("error", first["msg"])
            return JSONResponse(error_body(f"the request body is not valid JSON ({reason}); send a JSON object"),
                                status_code=400)
        loc = [str(part) for part in first["loc"] if part != "body"]
        param = ".".join(loc) or None
        return JSONResponse(error_body(f"{param or 'request body'}: {first['msg']}", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"{type(e).__name__}: {e}", kind="server_error"), status_code=500)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": generator.model_name, "object": "model", "created": created, "owned_by": "zerotrain"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        prompt = generator.chat_prompt([m.for_template() for m in request.messages], request.chat_template_kwargs)
        job = generator.job(prompt, request, request.max_completion_tokens or request.max_tokens, None, "messages")
        return await _respond(generator, request, job, chat=True, opened=opens_thinking(prompt))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        job = generator.job(request.prompt, request, request.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
        return await _respond(generator, request, job, chat=False)

    return app


def serve(model: str | Path, *, adapter: str | Path | None = None, tokenizer: str | Path | None = None,
          preset: str | None = None, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None) -> None:
    """Load the model (anything load_for_inference takes) and serve it until SIGTERM or Ctrl-C (then
    return normally)."""
    import signal

    import uvicorn

    from engine.apps.generate import load_for_inference

    name = model_name or Path(model).resolve().name
    loaded, tok = load_for_inference(model, adapter, tokenizer, preset=preset)
    generator = Generator(loaded, tok, name)
    server = uvicorn.Server(uvicorn.Config(create_app(generator), host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    # uvicorn shuts down gracefully on SIGTERM / SIGINT, then re-raises the signal to the handler it
    # found; a no-op one makes that graceful shutdown an ordinary return (exit status 0).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    print(f"zerotrain serve: '{name}' ({generator.context} tokens of context) at http://{host}:{port}/v1 "
          f"(the OpenAI client's base_url); SIGTERM or Ctrl-C stops it", flush=True)
    server.run()
