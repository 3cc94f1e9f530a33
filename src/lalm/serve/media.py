"""Audio parts of a request -> 16 kHz mono waves, under the server's media policy.

Sources: `input_audio` (base64 of a wav/mp3/flac/ogg file), `audio_url` with a `data:` URL,
a local file (`file://...` or a path) only inside `--allowed-local-media-path`, and an
http(s) URL only with `--allow-remote-media`. Every refusal is an `APIError` (4xx) naming
the part, so a bad upload never reaches the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_to_bytes, urlparse

import numpy as np
import soundfile as sf

from lalm.audio import SAMPLE_RATE, load_audio
from lalm.errors import LalmError
from lalm.serve.schemas import APIError, AudioURLPart, ChatRequest, InputAudioPart, TextPart


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: Path | None = None  # None: no local files at all
    allow_remote: bool = False
    max_audio_seconds: float = 600.0
    max_bytes: int = 25 * 1024 * 1024  # per audio file, same default as the request limit
    remote_timeout_s: float = 10.0


def _b64(data: str, param: str) -> bytes:
    # Some clients send the whole data: URL in input_audio.data; accept it.
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400, f"{param}: is not valid base64 ({len(data)} characters)", param, "invalid_base64"
        ) from None


def _data_url(url: str, param: str) -> bytes:
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise APIError(400, f"{param}: malformed data: URL (no ',')", param, "invalid_url")
    if head.endswith(";base64"):
        return _b64(payload, param)
    # Percent-escapes stand for bytes (RFC 2397); unquote() would read them as UTF-8 text and
    # turn every byte >= 0x80 into '?', silently corrupting the audio.
    return unquote_to_bytes(payload)


def _local_file(path_str: str, param: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_path is None:
        raise APIError(
            400,
            f"{param}: local files are disabled on this server "
            "(start it with --allowed-local-media-path DIR)",
            param,
            "local_media_disabled",
        )
    root = Path(os.path.realpath(policy.allowed_local_path))
    path = Path(path_str)
    if not path.is_absolute():
        path = root / path
    # realpath resolves `..` and symlinks, so neither can walk out of the allowed folder.
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise APIError(
            400,
            f"{param}: {path_str!r} is outside the allowed media folder {str(root)!r}",
            param,
            "media_path_not_allowed",
        )
    if not real.is_file():
        raise APIError(400, f"{param}: no such file {path_str!r}", param, "media_not_found")
    if real.stat().st_size > policy.max_bytes:
        raise APIError(
            413, f"{param}: file is larger than {policy.max_bytes} bytes", param, "audio_too_large"
        )
    return real.read_bytes()


def _remote(url: str, param: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise APIError(
            400,
            f"{param}: remote media URLs are disabled on this server "
            "(start it with --allow-remote-media)",
            param,
            "remote_media_disabled",
        )
    import httpx

    try:
        with httpx.stream("GET", url, timeout=policy.remote_timeout_s, follow_redirects=True) as r:
            if r.status_code != 200:
                raise APIError(
                    400, f"{param}: fetching {url!r} gave HTTP {r.status_code}", param, "fetch"
                )
            chunks, size = [], 0
            for chunk in r.iter_bytes():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise APIError(
                        413,
                        f"{param}: {url!r} is larger than {policy.max_bytes} bytes",
                        param,
                        "audio_too_large",
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise APIError(400, f"{param}: could not fetch {url!r}: {e}", param, "fetch") from None


def audio_bytes(part: InputAudioPart | AudioURLPart, param: str, policy: MediaPolicy) -> bytes:
    """The file bytes an audio part refers to (not yet decoded)."""
    if isinstance(part, InputAudioPart):
        return _b64(part.input_audio.data, f"{param}.input_audio.data")
    url = part.audio_url.url
    param = f"{param}.audio_url.url"
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        return _data_url(url, param)
    if scheme == "file":
        return _local_file(unquote(urlparse(url).path), param, policy)
    if scheme in ("http", "https"):
        return _remote(url, param, policy)
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return _local_file(url, param, policy)
    raise APIError(400, f"{param}: unsupported URL scheme {scheme!r}", param, "invalid_url")


def _declared_seconds(raw: bytes) -> float | None:
    """The length a file's header declares, or None where soundfile cannot read the header.

    soundfile sizes its decode buffer from this frame count, and silence compresses ~1000x
    in FLAC: checking it first keeps a small upload that declares hours of audio from being
    decoded into gigabytes before the length limit refuses it. It is an estimate for an MP3
    without a Xing header, hence the slack where `decode_audio` uses it."""
    try:
        info = sf.info(io.BytesIO(raw))
    except Exception:  # noqa: BLE001 (not a header soundfile knows: load_audio reports it)
        return None
    return info.frames / info.samplerate if info.samplerate > 0 and info.frames > 0 else None


def _too_long(seconds: float, param: str, policy: MediaPolicy) -> APIError:
    return APIError(
        400,
        f"{param}: audio is {seconds:.1f} s, longer than this server's limit of "
        f"{policy.max_audio_seconds:g} s",
        param,
        "audio_too_long",
    )


def decode_audio(raw: bytes, param: str, policy: MediaPolicy) -> np.ndarray:
    """File bytes -> float32 mono 16 kHz, refusing non-audio, empty and too long input."""
    if len(raw) > policy.max_bytes:
        raise APIError(
            413, f"{param}: audio is larger than {policy.max_bytes} bytes", param, "audio_too_large"
        )
    if not raw:
        raise APIError(400, f"{param}: audio is empty", param, "invalid_audio")
    declared = _declared_seconds(raw)
    if declared is not None and declared > 2 * policy.max_audio_seconds:
        raise _too_long(declared, param, policy)  # so nothing over 2x the limit is decoded
    try:
        wave = load_audio(raw)
    except LalmError as e:
        raise APIError(400, f"{param}: {e}", param, "invalid_audio") from None
    except Exception as e:  # noqa: BLE001 (a decoder bug on hostile bytes is the input's fault)
        raise APIError(
            400, f"{param}: could not decode audio ({type(e).__name__})", param, "invalid_audio"
        ) from None
    seconds = len(wave) / SAMPLE_RATE
    if seconds > policy.max_audio_seconds:  # the header check above only refuses past 2x
        raise _too_long(seconds, param, policy)
    return wave


def build_conversation(req: ChatRequest, policy: MediaPolicy) -> list[dict[str, Any]]:
    """OpenAI messages -> lalm chat messages with decoded waves (see docs/design.md)."""
    conversation = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            conversation.append({"role": role, "content": m.content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(m.content):
            param = f"messages[{i}].content[{j}]"
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                wave = decode_audio(audio_bytes(part, param, policy), param, policy)
                parts.append(
                    {"type": "audio", "audio": {"array": wave, "sampling_rate": SAMPLE_RATE}}
                )
        conversation.append({"role": role, "content": parts})
    return conversation
