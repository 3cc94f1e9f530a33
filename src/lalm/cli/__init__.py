"""Command-line front ends for inference (`lalm chat`, `lalm generate`)."""
