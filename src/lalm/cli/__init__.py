"""Command-line front ends for inference (`lalm chat`, `lalm generate`)."""

from __future__ import annotations

import argparse


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """Options both inference commands share: sampling (None = the checkpoint's
    generation_config.json) and where the weights are loaded."""
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the checkpoint's)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=None, help="> 1: beam search (greedy only)")
    parser.add_argument("--length-penalty", type=float, default=None,
                        help="beam search: finished beams score sum log p / length ** this (default 1.0)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: as stored)")
    parser.add_argument("--device", default=None)


def decoding_options(args: argparse.Namespace) -> dict:
    """The sampling flags as `LALM.generate` keywords (None = the checkpoint's default), checked
    now, so a bad value fails before a multi-GB model is loaded (the checkpoint's own defaults
    are checked once it is)."""
    from lalm.api import GenerationDefaults

    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "top_k": args.top_k, "seed": args.seed, "num_beams": args.num_beams,
               "length_penalty": args.length_penalty}
    GenerationDefaults().options(**options)  # raises ConfigError naming the bad flag's option
    return options
