"""Files of other projects: HF model directories, orbax params, peft and T-Few adapters."""
