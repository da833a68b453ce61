"""Quantization primitives, calibration observers and integer-only kernels."""
