"""The jitted train step, the one training loop and its hooks, state, checkpoints, partitioning."""
