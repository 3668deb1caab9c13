"""Kernel implementations: reference.py (eager PyTorch), triton/ (Triton), and the compiled
llmcore._native extension built from csrc/."""
