"""Build script: the pure-Python package plus the compiled extension llmcore._native.

llmcore._native holds the csrc/ kernels and their torch.library registration. It is built
  - for the CPU whenever a C++ compiler is found (otherwise the install goes on without it, and
    the "native" backend reports itself unavailable);
  - with the CUDA kernels too when torch has CUDA and nvcc is found (CUDA_HOME);
  - not at all with LLMCORE_SKIP_NATIVE=1.
Knobs: LLMCORE_CUDA_ARCHS ("80;90" by default: compute capabilities, ';' or ',' separated),
LLMCORE_NATIVE_ARCH (e.g. "native": adds -march=<value>; off by default so wheels stay
portable), MAX_JOBS (parallel compile jobs, torch's knob).

Sources: csrc/cpu/*.cpp and csrc/cuda/*.cu are globbed here exactly as CMakeLists.txt globs
them (the one source list); csrc/torch/*.cpp (the torch binding) is built only here. C++ flags:
csrc/flags.txt, read by both as well.
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    # relative paths: setuptools rejects absolute ones in an sdist/editable build
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _kernel_flags():
    with open(os.path.join(ROOT, "csrc", "flags.txt")) as f:
        return [line.strip() for line in f if line.strip().startswith("-")]


def _have_cxx():
    cxx = os.environ.get("CXX", "c++").split()[0]
    return shutil.which(cxx) is not None


def _cuda_archs():
    raw = os.environ.get("LLMCORE_CUDA_ARCHS", "80;90").replace(",", ";")
    archs = [a.strip() for a in raw.split(";") if a.strip()]
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _native_extension():
    """(ext_modules, cmdclass) for llmcore._native, or empty ones when it cannot be built."""
    if os.environ.get("LLMCORE_SKIP_NATIVE", "0") == "1" or not _have_cxx():
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # building without torch present: the pure-Python package only
        return [], {}

    cxx_flags = _kernel_flags()
    arch = os.environ.get("LLMCORE_NATIVE_ARCH")
    if arch:  # one chosen ISA instead of the per-ISA clones (csrc/cpu/parallel.h)
        cxx_flags += [f"-march={arch}", "-DLLMCORE_NATIVE_ARCH_BUILD"]
    kwargs = dict(
        name="llmcore._native",
        sources=_sources("csrc/cpu/*.cpp") + _sources("csrc/torch/*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        kwargs["sources"] += _sources("csrc/cuda/*.cu")
        kwargs["define_macros"] = [("LLMCORE_WITH_CUDA", "1")]
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo"] + _cuda_archs()
        ext = cpp_extension.CUDAExtension(**kwargs)
    else:
        ext = cpp_extension.CppExtension(**kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
