"""CUDA sources shipped with the package (this folder is installed as knowlip._kernels)."""
