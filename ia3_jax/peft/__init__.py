"""PEFT methods of the T-Few comparison, as module overrides of either model family.

Each method is one module here holding a registered config class
(`registry.PeftMethod`); `registry.methods()` lists them, `registry.make(name, **kw)`
builds one ("ia3", "lora", "bitfit", "layernorm", "prompt_tuning", "prefix_tuning",
"full", ...).
"""

from ia3_jax.peft.registry import PeftMethod, get_method, make, method_names, methods

__all__ = ["PeftMethod", "get_method", "make", "method_names", "methods"]
