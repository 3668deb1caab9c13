"""compile_model: torch.compile a model the way llmcore recommends.

llmcore's kernels are torch.library ops with fake (meta) impls and registered autograd, so the
compiler treats each one as an opaque node and traces the model around it: the training
forward and backward of a gpt2- or llama-style Transformer become one graph each (fullgraph).
Some inputs make Python branch on a size that depends on the data, which breaks the graph:
MLM labels given without `num_targets` do (the linear cross-entropy picks its schedule from the
number of targets, found by `nonzero`); with the host-side counts (`num_tokens`, `num_targets`,
which the trainer and the benchmark pass) every flavour and padded batch is one graph. For such
inputs "auto" falls back to a compile with graph breaks, once, and says so with a warning.

Mode: inductor's default on every device. "reduce-overhead" records CUDA graphs, which need
static input addresses and a fixed memory pool and replay only the forward and backward (the
optimizer step runs outside the graph, between replays); "max-autotune" benchmarks GEMM
templates for minutes. Neither is a safe default we could verify here; callers may pass `mode`.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


class _FullgraphFirst(nn.Module):
    """Calls `module` compiled with fullgraph=True; the first call that cannot be one graph
    switches, for good, to the same module compiled with graph breaks."""

    def __init__(self, module: nn.Module, options: dict):
        super().__init__()
        self.module = module                    # the only registered child: one set of parameters
        # kept in a tuple so nn.Module does not register them (no duplicate state_dict keys)
        self._compiled = (torch.compile(module, fullgraph=True, **options),)
        self._options = options
        self.fullgraph = True

    def forward(self, *args, **kwargs):
        try:
            return self._compiled[0](*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:
            if not self.fullgraph:
                raise
            # dynamo raises while tracing, before any of the call has run: retrying is safe
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            warnings.warn(f"compile_model: {type(self.module).__name__} is not one graph for "
                          f"these inputs ({type(exc).__name__}: {first}); compiling it with "
                          "graph breaks instead", stacklevel=2)
            self.fullgraph = False
            self._compiled = (torch.compile(self.module, **self._options),)
            return self._compiled[0](*args, **kwargs)


def compile_model(model: nn.Module, *, fullgraph: bool | None = None, mode: str | None = None,
                  **options) -> nn.Module:
    """`model` under torch.compile, as `llmcore pretrain --compile` and the benchmarks use it.

    fullgraph: None ("auto") compiles one graph per call and falls back to graph breaks, with
    a warning, at the first call that cannot be one graph (MLM labels without num_targets); True fails on a
    graph break instead; False allows graph breaks from the start. mode: torch.compile's (default: inductor's default; see the module docstring).
    Other keyword arguments (backend, dynamic, options) go to torch.compile.
    The result is called like `model`; its parameters are `model`'s, under the prefix "module."
    when fullgraph is None (save checkpoints from `model` itself).
    """
    if mode is not None:
        options["mode"] = mode
    if fullgraph is None:
        return _FullgraphFirst(model, options)
    return torch.compile(model, fullgraph=fullgraph, **options)
