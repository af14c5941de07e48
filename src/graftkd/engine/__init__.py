"""Training machinery shared by every stage and method: loops, checkpoints, results, devices."""
