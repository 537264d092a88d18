"""The transformers integration: the qdlm quantizer, the quantized linear layer, and self-contained packaging."""
