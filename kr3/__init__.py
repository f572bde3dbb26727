"""kr3: GPT language models on the KR3 Korean review corpus, configured with Hydra."""

__version__ = "0.1.0"
