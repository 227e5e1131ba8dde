"""Numba kernels (CPU and CUDA) with torch references. See kernels/_backend.py for the contract."""
