"""qdlm-export bench: kernel micro-benchmarks and a denoising step, as ratios to the fastest dense path."""
