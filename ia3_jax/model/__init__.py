"""The T5X-compatible T5 network, its config, param-tree utilities and decoding."""
