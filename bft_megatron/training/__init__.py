"""The trainer: megatron-core schedules, DDP, optimizer, BFT loss, validation, logging."""
