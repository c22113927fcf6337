"""Triangle attention executors of a work plan: torch (CPU) and Triton (GPU)."""
