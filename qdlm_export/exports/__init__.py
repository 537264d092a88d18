"""Exports of quantized weights to other toolkits' layouts (GPTQ, AWQ, compressed-tensors)."""
