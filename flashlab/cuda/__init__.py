"""numba.cuda kernels: sources, launch path, registry and traffic counter (see ARCHITECTURE.md)."""
