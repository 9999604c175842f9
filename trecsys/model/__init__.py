"""The model: the network, its checkpoints, and the transfer strategies that build it."""
