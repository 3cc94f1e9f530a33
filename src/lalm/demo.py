"""The embedded default end to end: corpus, three training stages, evaluation, chat.

Placeholder until the embedded-default issue fills it: prints the plan and exits 0.
"""

from __future__ import annotations

import argparse

PLAN = """lalm demo will:
  1. build the offline corpus (lalm data build --size full)
  2. pre-train, SFT and DPO lalm-tiny (configs/tiny/)
  3. evaluate on the held-out dev sets and print a results table
  4. show example turns (audio analysis and voice chat)
  5. print the commands to chat with and serve the model"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    print(PLAN)
    return 0
