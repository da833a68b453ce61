"""Per-site sensitivity: Hutchinson Hessian traces, HAWQ-V2 scores, noise injection, rank statistics."""
