"""Build script: the package plus the C++ extension `fastsft._C` (pybind11, numpy buffers, no libtorch).

`kernels/` is installed as the subpackage `fastsft.kernels`, never as a top-level `kernels` module
(that import name belongs to Hugging Face's kernel hub, which transformers probes for).
"""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "fastsft._C",
        sorted(glob("csrc/*.cpp")),
        depends=sorted(glob("csrc/*.h")),  # header edits trigger a rebuild, and the sdist carries the headers
        cxx_std=17,
        extra_compile_args=["-O3", "-fvisibility=hidden"],
    )
]

packages = find_packages(include=["fastsft", "fastsft.*"]) + ["fastsft.kernels"]

setup(
    packages=packages,
    package_dir={"fastsft.kernels": "kernels"},
    package_data={"fastsft": ["demo_data/*.jsonl", "demo_data/*.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
