"""Serve a model over an OpenAI-compatible HTTP API, with a voice-chat web page at `/`.

  lalm serve --model PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY]
             [--max-batch N] [--max-queue N] [--allowed-local-media-path DIR]
             [--allow-remote-media] [--max-audio-seconds S] [--max-request-bytes N]

Endpoints: POST /v1/chat/completions (text, input_audio, audio_url parts; stream),
POST /v1/audio/transcriptions, GET /v1/models, GET /health. Requests share one engine
that batches them continuously (up to --max-batch rows; --max-queue more wait, the rest
get HTTP 429). Ctrl-C stops accepting, lets running answers finish (up to
--shutdown-grace seconds), then exits.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lalm.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder (HF format)")
    p.add_argument("--fake", action="store_true",
                   help="serve a deterministic stand-in model instead (web-page work, tests)")
    p.add_argument("--served-model-name", help="model id clients use (default: folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LALM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LALM_API_KEY)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the batch")
    p.add_argument("--max-prefill-tokens", type=int, default=1024,
                   help="prompt tokens prefilled at once when many requests arrive together")
    p.add_argument("--allowed-local-media-path", type=Path,
                   help="audio_url may name local files inside this folder (default: none)")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="let audio_url fetch http(s) URLs (off by default)")
    p.add_argument("--max-audio-seconds", type=float, default=600.0)
    p.add_argument("--max-request-bytes", type=int, default=25 * 1024 * 1024)
    p.add_argument("--max-tokens", type=int, default=512,
                   help="completion length when a request does not set max_tokens")
    p.add_argument("--asr-prompt", default="Transcribe this audio.",
                   help="instruction used by /v1/audio/transcriptions (instruct checkpoints)")
    p.add_argument("--asr-raw-prompt", default=None,
                   help="for a base checkpoint: the raw ASR prompt, e.g. '<|audio_bos|><|AUDIO|>"
                        "<|audio_eos|>Detect the language and recognize the speech: <|{language}|>'"
                        " ({language} = the request's language, default en)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="KV-cache tokens per row (prompt + answer; default min(context, 4096))")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 suits small models "
                        "on busy CPUs)")
    p.add_argument("--shutdown-grace", type=float, default=30.0)


def run(args: argparse.Namespace) -> int:
    # Check the options before the heavy imports: a typo fails in a blink.
    if args.max_batch < 1 or args.max_queue < 0:
        raise ConfigError("--max-batch must be >= 1 and --max-queue >= 0")
    allowed = args.allowed_local_media_path
    if allowed is not None and not allowed.is_dir():
        raise ConfigError(f"--allowed-local-media-path: {allowed} is not a folder")
    if not (args.fake or args.model):
        raise ConfigError("--model PATH is required (or --fake)")

    from lalm.serve.app import ServerConfig, create_app
    from lalm.serve.engine import Engine
    from lalm.serve.media import MediaPolicy

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.fake:
        from lalm.serve.fake import FakeBackend

        backend = FakeBackend(step_delay_s=0.02, model_name=args.served_model_name or "fake")
    else:
        from lalm.serve.backend import LALMBackend

        backend = LALMBackend.load(args.model, dtype=args.dtype, device=args.device,
                                   max_batch=args.max_batch, max_model_len=args.max_model_len,
                                   name=args.served_model_name)
    config = ServerConfig(
        api_key=args.api_key or None,
        max_request_bytes=args.max_request_bytes,
        media=MediaPolicy(
            allowed_local_path=allowed,
            allow_remote=args.allow_remote_media,
            max_audio_seconds=args.max_audio_seconds,
            max_bytes=args.max_request_bytes,
        ),
        default_max_tokens=args.max_tokens,
        asr_prompt=args.asr_prompt,
        asr_raw_prompt=args.asr_raw_prompt,
        shutdown_grace_s=args.shutdown_grace,
    )
    # (the real backend may hold fewer rows than asked: what its GPU's free memory fits)
    app = create_app(Engine(backend, max_batch=getattr(backend, "max_batch", args.max_batch), max_queue=args.max_queue,
                            max_prefill_tokens=args.max_prefill_tokens), config)
    print(f"lalm serve: {backend.model_name} on http://{args.host}:{args.port}/", flush=True)
    server = _server(app, host=args.host, port=args.port, log_level="info")
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        server.run()
    return 0 if server.started else 3  # uvicorn.run's exit code for a failed start (port taken)


def _server(app, grace_s: float | None = None, **config):
    """A uvicorn.Server for `app` whose shutdown (Ctrl-C, SIGTERM) stops the engine first.

    uvicorn ends the lifespan (where the app stops the engine) only after its own wait for
    open requests, and cancels those still open when that wait times out: a bare 500 or a
    cut stream, and queued requests kept running. Stopped first, the engine 503s what waits
    at once and what still decodes at the grace deadline, before uvicorn's wait runs out."""
    import uvicorn

    grace = app.state.config.shutdown_grace_s if grace_s is None else grace_s

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.engine.stop(grace)
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, timeout_graceful_shutdown=math.ceil(grace) + 2, **config))


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1") -> Iterator[str]:
    """Run `app` under uvicorn in a thread on a free port; yields its base URL.

    For tests and bench/serve.py: the real server stack (HTTP parsing, streaming,
    disconnects), not an in-process shortcut.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    # Tests end within 5 s even with an answer still running (uvicorn's wait used to be 5 s).
    server = _server(app, min(app.state.config.shutdown_grace_s, 5.0), log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
