"""Install metadata for ia3-jax."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


DATA_PATTERNS = ("*.gin", "*.yaml", "*.json", "*.jsonl", "*.csv", "*.model", "*.md", "*.safetensors")
# gin/ lives at the top level of the repo and ships inside the package as ia3_jax.gin (a
# checkout keeps it at the top level, where gin_configurables.gin_dir finds it).
MAPPED = {"ia3_jax.gin": "gin"}


def _data_files(root: str, skip: tuple[str, ...] = ()) -> list[str]:
  """Data files under `root` (relative to it), leaving out the subfolders `skip`."""
  base = HERE / root
  files = {p.relative_to(base) for pat in DATA_PATTERNS for p in base.rglob(pat)}
  return sorted(str(f) for f in files if f.parts[0] not in skip)


def _packages() -> list[str]:
  """Every Python package: ia3_jax's own (ia3_jax.tasks included), and the data-only
  ia3_jax.gin (no __init__.py: as a package it would shadow gin-config)."""
  own = find_packages(include=["ia3_jax", "ia3_jax.*"], exclude=[f"{m}*" for m in MAPPED])
  return sorted(own + ["ia3_jax.gin"])


setup(
    name="ia3-jax",
    version="0.1.0",
    description="Few-shot parameter-efficient fine-tuning of T5-family models with (IA)^3 and the T-Few recipe, in JAX/Flax.",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"ia3_jax": "ia3_jax", **MAPPED},
    package_data={"ia3_jax.gin": _data_files("gin"),
                  "ia3_jax": _data_files("ia3_jax", skip=("gin",))},
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "seqio>=0.0.19",
        "tensorflow>=2.16",
        "tensorflow-text>=2.16",
        "tensorflow-datasets>=4.9",
        "gin-config>=0.5",
        "safetensors>=0.4",
        "qwix>=0.1.8",
        "sentencepiece>=0.2",
        "numpy",
        "jinja2>=3.1",
        "pyyaml>=6",
        "tqdm",
        "clu>=0.0.10",
        "tensorboard",
        "matplotlib",
        "importlib_resources",  # tensorflow-datasets needs it to prepare builders
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "torch==2.13.0",
            "transformers>=5.0",
            "peft>=0.17",
            "nbformat",
            "nbclient",
            "ipykernel",
        ],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["ia3-jax=ia3_jax.cli:main"]},
)
