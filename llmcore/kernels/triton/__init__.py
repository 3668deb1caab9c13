"""Triton kernels and their launchers, one file per op family. Importing this package imports
triton; only llmcore.ops imports it, lazily, when the triton backend is chosen."""
