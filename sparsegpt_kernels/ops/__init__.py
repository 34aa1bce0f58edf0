"""Triton kernels of sparsegpt_kernels, one module per kernel family.

``sweep``   the blocked column sweep (mask selection, OBS updates, joint quantization, lazy GEMM);
``nm_mask`` the standalone "N kept of every M" keep-mask selection.

Importing this package imports nothing heavy: each submodule imports triton itself and registers its ops in the
``sparsegpt_kernels`` torch.library namespace when it is first imported.
"""
