"""The native checkpoint format: its spec (tensor names, quantization_config, report), the writer, validation, and staged output folders."""
