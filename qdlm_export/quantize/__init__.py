"""The quantize stage: source reading, calibration, the block pipeline, fidelity checks and the quantize() entry point."""
