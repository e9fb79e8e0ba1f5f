"""Communication: transport with timeouts and abort, link-delay emulation, per-generation process groups."""
