"""Shared training machinery for the stages: loss, trainer, checkpoints, the causal-LM recipe."""
