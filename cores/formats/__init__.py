"""On-disk formats the runtime reads and the stages write: the deployed (compressed-tensors) checkpoint."""
