"""Training: the distributed environment, the DeepSpeed engine, checkpoints and the loop."""
