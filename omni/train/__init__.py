"""Training: `omni train` (plain-PyTorch backend: one process, or DDP/FSDP2 under torchrun)."""
