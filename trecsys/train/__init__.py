"""Training: the engine (loop, resume, DDP, mixed precision), losses, and the windows cut from sequences."""
