"""On-disk formats: bit packing, the native qdlm layout, sharded writing."""
