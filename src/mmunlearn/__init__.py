"""mmunlearn: machine unlearning for multimodal LLMs (SIU, MMUnlearner and baselines)."""

__version__ = "0.1.0"
