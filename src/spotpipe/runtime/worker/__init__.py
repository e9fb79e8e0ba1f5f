"""The worker process: step loop, recovery agent, mirror, tied-copy exchange, phase faults."""
