"""The arithmetic every stage shares: integer schemes, bit packing, method configs, Hadamard matrices, input transforms, activation quantizers, argument checks."""
