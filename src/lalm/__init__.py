"""lalm: large audio-language models (Qwen2-Audio end to end).

    import lalm
    model = lalm.load("path/to/checkpoint")       # -> lalm.LALM (.logits, .generate, .stream)
"""

from __future__ import annotations

__all__ = ["LALM", "GenerationResult", "load"]


def __getattr__(name: str):
    # Lazy: `lalm <command>` and `import lalm.errors` should not pay for importing torch.
    if name in __all__:
        from lalm import api

        return getattr(api, name)
    raise AttributeError(f"module 'lalm' has no attribute {name!r}")
