"""Public ops, one module per family: input checks, backend dispatch, torch.library
registration (fake impls, autograd) of the kernel-backed implementations."""
