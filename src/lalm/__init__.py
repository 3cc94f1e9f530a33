"""lalm: large audio-language models (Qwen2-Audio end to end)."""
