"""The torch side of spotpipe: controller and worker processes, transport, executor, offload."""
