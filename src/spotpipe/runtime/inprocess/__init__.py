"""Single-process reference trainer and the in-process convergence mode."""
