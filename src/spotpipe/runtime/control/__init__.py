"""The controller process: membership, recovery supervisor, local launch, fault injection, progress, plots."""
