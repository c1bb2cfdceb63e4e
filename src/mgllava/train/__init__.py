"""Two-stage training (docs/design.md section 8): stages as data, a torchrun + FSDP2 trainer, DCP checkpoints."""
