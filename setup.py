"""fastclip-ds: FastCLIP compositional contrastive training on DeepSpeed."""

from setuptools import find_packages, setup

# torch/torchvision are pinned so that a CPU install never resolves to a CUDA build
# (open_clip -> torchvision -> newest torch). A GPU user installs this package over
# their own CUDA torch with `pip install --no-deps -e .`.
CPU_PINS = ["torch==2.13.0", "torchvision==0.28.0"]

setup(
    name="fastclip-ds",
    version="0.1.0",
    description="FastCLIP (global contrastive losses, sharded u, fused kernels) on DeepSpeed",
    python_requires=">=3.10",
    packages=[*find_packages(include=["fastclip_ds", "fastclip_ds.*"]), "fastclip_kernels"],
    package_dir={"fastclip_kernels": "kernels"},
    package_data={"fastclip_ds": ["model_configs/*.json"]},
    install_requires=[
        *CPU_PINS,
        "deepspeed==0.19.8",
        "open_clip_torch==3.3.0",
        "timm>=1.0.17",
        "webdataset==1.0.2",
        "triton",
        "ninja",
        "tensorboard",
        "tqdm",
        "scikit-learn",
        "matplotlib",
    ],
    extras_require={"dev": ["pytest", "ruff"], "wandb": ["wandb"]},
    entry_points={"console_scripts": ["fastclip-ds=fastclip_ds.cli:main"]},
)
