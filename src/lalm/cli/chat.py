"""Chat with a model: one turn, or an interactive session on a terminal.

  lalm chat --model PATH --audio clip.wav --prompt "What is this sound?"   one turn, streamed
  lalm chat --model PATH --audio question.wav                              voice chat (audio alone)
  lalm chat --model PATH --prompt "Hi" --json                              one JSON result
  lalm chat --model PATH                                                   interactive session

Interactive: a line is a text turn; `/audio FILE [FILE ...]` attaches audio to the next turn
(an empty line then sends the audio alone: a voice-chat turn); `/reset` starts over; `/exit`
(or Ctrl-D) quits. --model is a checkpoint folder or a hub name in the local Hugging Face cache.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from lalm.cli import add_decoding_options, decoding_options
from lalm.errors import AudioError, ConfigError, ContextLengthError, LalmError

HELP = ("a line is a text turn; /audio FILE [FILE ...] attaches audio to the next turn "
        "(Enter on an empty line sends it alone); /reset; /exit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or hub name (local HF cache)")
    parser.add_argument("--audio", action="append", default=[], metavar="FILE",
                        help="audio file for the turn (repeatable; several audios in one turn)")
    parser.add_argument("--prompt", help="text of the turn")
    parser.add_argument("--system", help="system prompt (default: the template's 'You are a helpful assistant.'; "
                        "--system '' gives an empty system turn)")
    parser.add_argument("--json", action="store_true", help="print one JSON result instead of streaming text")
    add_decoding_options(parser)


def _check_audio(paths: Iterable[str]) -> list[str]:
    """Fail before loading a multi-GB model when a file is plainly missing."""
    for p in paths:
        if not Path(p).is_file():
            raise AudioError(f"{p}: file not found")
    return list(paths)


def _user_turn(audios: list[str], text: str | None) -> dict:
    content = [{"type": "audio", "audio": a} for a in audios]
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _reply(model, conversation: list[dict], options: dict, out: TextIO) -> str:
    """Stream one answer to `out`; return its text."""
    stream = model.stream(conversation, **options)
    while True:
        try:
            piece = next(stream)
        except StopIteration as stop:
            out.write("\n")
            out.flush()
            return stop.value.text
        out.write(piece)
        out.flush()


def interactive(model, lines: Iterable[str], out: TextIO, err: TextIO, options: dict,
                system: str | None = None) -> None:
    """The session loop, reading commands and turns from `lines` (stdin on a terminal)."""
    # `is not None`: an empty --system is an empty system turn, not the template's default one
    base = [{"role": "system", "content": system}] if system is not None else []
    history: list[dict] = list(base)
    pending: list[str] = []
    for raw in lines:
        line = raw.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history, pending = list(base), []
            err.write("(conversation reset)\n")
            continue
        if line.startswith("/audio"):
            try:
                files = shlex.split(line[len("/audio"):])
                pending += _check_audio(files) if files else []
            except (ValueError, LalmError) as e:
                err.write(f"error: {e}\n")
                continue
            err.write(f"(attached: {', '.join(pending) or 'nothing'}; type a message, or Enter to send "
                      "the audio alone)\n")
            continue
        if line.startswith("/"):
            err.write(f"unknown command {line.split()[0]!r}: {HELP}\n")
            continue
        if not line.strip() and not pending:
            continue
        turn = _user_turn(pending, line.strip() or None)
        try:
            text = _reply(model, [*history, turn], options, out)
        except LalmError as e:  # a bad file or an over-long conversation: say so, keep the session
            err.write(f"error: {e}\n")
            if isinstance(e, ContextLengthError) and history:  # every later turn would fail too
                err.write("(the conversation no longer fits the context: /reset to start over)\n")
            continue
        finally:
            pending = []
        history += [turn, {"role": "assistant", "content": text}]


def run(args: argparse.Namespace) -> int:
    import lalm

    audios = _check_audio(args.audio)
    options = decoding_options(args)
    one_turn = args.prompt is not None or bool(audios)
    if not one_turn and not sys.stdin.isatty():
        raise ConfigError("no --prompt or --audio and stdin is not a terminal: give a turn, or run it "
                          "in a terminal for an interactive session")
    model = lalm.load(args.model, dtype=args.dtype, device=args.device)
    if one_turn:
        conversation = [{"role": "system", "content": args.system}] if args.system is not None else []
        conversation.append(_user_turn(audios, args.prompt))
        if args.json:
            (result,) = model.generate(conversation, **options)
            print(json.dumps(result.to_dict(), ensure_ascii=False))
        else:
            _reply(model, conversation, options, sys.stdout)
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"lalm chat: {args.model} ({HELP})", file=sys.stderr)

    def lines():
        while True:
            try:
                yield input("> ")
            except EOFError:
                print(file=sys.stderr)
                return

    interactive(model, lines(), sys.stdout, sys.stderr, options, args.system)
    return 0
