"""Per-site profiling: error and utilisation metrics comparing FP32 and quantized tensors."""
