"""Reinforcement learning from feedback: prompts for rollouts, our PPO trainer, reward functions."""
