"""Packaging for yagg.

The same file serves three purposes:
  * `pip install -e '.[test]'` for development (what `make test` does);
  * `pip install .` on a training host (add `[tpu]` or `[cuda]`);
  * Dataflow's `--setup_file ./setup.py`: the workers build an sdist of this project and install it, so
    `install_requires` lists exactly what a pipeline worker imports. `tests/test_packaging.py` checks that
    the sdist carries every module the pipeline imports.
"""

from setuptools import find_packages, setup

# Everything here was checked to install together on Python 3.11 (CPU).
INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "jaxlib>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax",
    "apache-beam>=2.77,<2.78",
    "tensorflow-cpu>=2.21,<2.22",
    "tensorboard",
    "array-record>=0.8,<0.9",
    "grain>=0.2,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "clu",
    "imageio",
    "pillow<13",  # Beam 2.77 caps Pillow below 13.
    "ml-collections",
    "safetensors",
    "huggingface-hub",  # CLIP checkpoints by hub name (model/clip.py)
    "transformers",  # the CLIP tokenizer only; the model is our own Flax port (model/clip.py)
    "numpy",
]

setup(
    name="yagg",
    version="0.1.0",
    description="yet another GIF generator: text-to-GIF diffusion in JAX/Flax, from captioned GIFs to scored samples",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["yagg", "yagg.*", "pipeline", "pipeline.*", "model", "model.*",
                                    "train", "train.*", "eval", "eval.*", "configs", "configs.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist", "ruff"],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        "cuda": ["jax[cuda12]>=0.10,<0.11"],
        # What a machine that launches Dataflow jobs needs on top (the workers' image has it already).
        "gcp": ["apache-beam[gcp]>=2.77,<2.78"],
    },
    entry_points={"console_scripts": ["yagg = yagg.cli:main"]},
)
