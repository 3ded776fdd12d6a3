"""vit-accel: one Vision Transformer, trained the same way on CPU, NVIDIA GPUs and Graphcore IPUs."""
from setuptools import find_packages, setup

setup(
    name="vit-accel",
    version="0.1.0",
    description="Portable Vision Transformer training: CPU, GPU (Triton + DeepSpeed) and IPU (PopTorch)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.8",
    # The Triton kernels live in the repository's kernels/ folder and install as
    # `vit_accel_kernels` (a bare `kernels` is another PyPI project's import name).
    # The recipes live in the repository's configs/ (the one source) and install as vit_accel/configs/.
    packages=find_packages(include=["vit_accel", "vit_accel.*"]) + ["vit_accel_kernels", "vit_accel.configs"],
    package_dir={"vit_accel_kernels": "kernels", "vit_accel.configs": "configs"},
    package_data={"vit_accel.configs": ["*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.0.1",
        "numpy",
        "pillow",
        "pyyaml",
        "webdataset>=0.2",
        "safetensors",
        "scikit-learn",  # ships the digits images of the embedded default
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "gpu": ["triton>=3.6", "deepspeed>=0.14"],
        "test": ["pytest", "pytest-benchmark", "vermin", "transformers", "triton>=3.6", "tensorboard",
                 "torchvision", "timm"],
        "timm": ["torchvision", "timm"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["vit-accel=vit_accel.cli:entry"]},
)
