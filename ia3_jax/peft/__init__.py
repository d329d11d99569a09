"""PEFT baselines of the T-Few comparison, as module overrides of the T5 network.

`registry.get_method(name)` gives a uniform `Method` for "ia3", "lora", "bitfit",
"layernorm", "prompt_tuning", "prefix_tuning" and "full".
"""

from ia3_jax.peft.registry import METHODS, Method, get_method, method_names

__all__ = ["METHODS", "Method", "get_method", "method_names"]
