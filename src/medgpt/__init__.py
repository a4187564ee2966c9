"""medgpt: train a medical LLM through the full ChatGPT recipe (PT -> SFT -> RM -> PPO, DPO and friends)."""

__version__ = "0.1.0"
