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
