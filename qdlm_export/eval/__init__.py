"""Evaluation of masked diffusion LMs, original and quantized alike (likelihood, generation)."""
