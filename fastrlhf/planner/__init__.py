"""Memory planner: predicts the peak GPU memory of a fastrlhf (or TRL-style) training step by running
the real step code on fake tensors. See `fastrlhf.planner.simulate` and `fastrlhf.planner.plan`."""
