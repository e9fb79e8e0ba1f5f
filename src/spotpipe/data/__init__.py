"""Tokenizers, memory-mapped token files and the resumable sequence sampler (no torch here)."""
