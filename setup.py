"""Build the fusedloss extension against the torch installed in this environment.

    pip install --no-build-isolation -e .      # or without -e

Environment variables (all optional):
    FUSEDLOSS_CUDA=0|1            force a CPU-only build, or require the CUDA kernels
                                  (default: build them when torch has CUDA and nvcc exists)
    TORCH_CUDA_ARCH_LIST="9.0"    GPU architectures (default: the visible GPUs, or
                                  FUSEDLOSS_DEFAULT_ARCHS when none is visible)
    FUSEDLOSS_CPU_CAPABILITY=default|avx2|avx512
                                  instruction set of the CPU kernels (default: what
                                  torch detects on the build machine)
    CUDA_HOME                     CUDA toolkit root (default: resolved from nvcc)
    MAX_JOBS                      parallel compile jobs
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Short on purpose: every arch multiplies nvcc time (~35 s per .cu per arch on
# 2 cores). sm_80 SASS also runs on Ampere/Ada; compute_90 PTX JITs on newer GPUs.
FUSEDLOSS_DEFAULT_ARCHS = "8.0;9.0+PTX"

try:
    import torch
except ImportError:  # pragma: no cover - exercised only on a broken setup
    sys.exit(
        "fusedloss is compiled against the torch in your environment, and none "
        "was found.\nInstall torch first, then build without build isolation:\n"
        "    pip install torch ninja\n"
        "    pip install --no-build-isolation .\n"
    )


def _version():
    ns = {}
    with open(os.path.join(ROOT, "fusedloss", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _has_cudart(root):
    return bool(root) and any(
        os.path.exists(os.path.join(root, lib, "libcudart.so"))
        for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))
    )


def _toolkit_root_from_nvcc(nvcc):
    """The real toolkit root behind `nvcc`, which may be a wrapper script.

    torch derives CUDA_HOME from the parent of nvcc's folder; when nvcc is a
    wrapper (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc) that
    folder has no libcudart and linking fails with `cannot find -lcudart`. nvcc's
    dry run prints the folder of the real binary.
    """
    real = os.path.realpath(nvcc)
    cand = os.path.dirname(os.path.dirname(real))
    if _has_cudart(cand):
        return cand
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        with open(src, "w") as f:
            f.write("__global__ void probe() {}\n")
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    if m:
        cand = os.path.dirname(os.path.abspath(m.group(1)))
        if _has_cudart(cand):
            return cand
    return None


def _find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and _has_cudart(root) and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root_from_nvcc(nvcc)
        if root:
            return root
    for root in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _has_cudart(root) and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def _want_cuda():
    flag = os.environ.get("FUSEDLOSS_CUDA", "").strip().lower()
    torch_cuda = torch.version.cuda is not None
    if flag in ("0", "false", "off", "no"):
        return False, None
    cuda_home = _find_cuda_home() if torch_cuda else None
    if flag in ("1", "true", "on", "yes"):
        if not torch_cuda:
            sys.exit(
                f"FUSEDLOSS_CUDA=1 but the installed torch {torch.__version__} has no "
                "CUDA support. Install a CUDA build of torch, or unset FUSEDLOSS_CUDA."
            )
        if cuda_home is None:
            sys.exit(
                "FUSEDLOSS_CUDA=1 but no CUDA toolkit was found (no nvcc with a "
                "libcudart next to it). Set CUDA_HOME to the toolkit root."
            )
    return cuda_home is not None, cuda_home


def _arch_list():
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        return env
    try:
        n = torch.cuda.device_count()
    except Exception:  # pragma: no cover
        n = 0
    if n:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(n)})
        return ";".join(f"{a}.{b}" for a, b in caps)
    return FUSEDLOSS_DEFAULT_ARCHS


# ATen compiles each vectorized kernel once per instruction set; these are the
# flags its own build uses for the at::vec specializations we rely on.
_CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _cpu_capability():
    env = os.environ.get("FUSEDLOSS_CPU_CAPABILITY", "").strip().upper()
    cap = env or torch.backends.cpu.get_cpu_capability().upper()
    if cap not in _CPU_CAPABILITY_FLAGS:
        # e.g. ZVECTOR/VSX/SVE on other platforms: the portable at::vec path.
        cap = "DEFAULT"
    if not (sys.platform.startswith("linux") and os.uname().machine in ("x86_64", "AMD64")):
        cap = "DEFAULT"
    return cap


def main():
    version = _version()
    use_cuda, cuda_home = _want_cuda()
    if use_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME once, when first imported.
        os.environ["CUDA_HOME"] = cuda_home
        archs = _arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    else:
        archs = ""
    import torch.utils.cpp_extension as cpp_ext

    if use_cuda:
        cpp_ext.CUDA_HOME = cuda_home

    cap = _cpu_capability()
    cxx_flags = [
        "-O3",
        "-fopenmp",  # without it at::parallel_for inside the extension runs serially
        "-fno-math-errno",
        # No silent a*b+c -> fma contraction: the same formula then rounds the
        # same way in every instantiation (pos_weight=1 equals no pos_weight,
        # bit for bit) and in every build.
        "-ffp-contract=off",
        "-DCPU_CAPABILITY=" + cap,
        "-DCPU_CAPABILITY_" + cap,
        f'-DFUSEDLOSS_TORCH_VERSION="{torch.__version__}"',
        f'-DFUSEDLOSS_VERSION="{version}"',
    ] + _CPU_CAPABILITY_FLAGS[cap]
    if cap == "DEFAULT":
        cxx_flags = [f for f in cxx_flags if not f.startswith("-DCPU_CAPABILITY_")]
    link_flags = ["-fopenmp"]

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    define_macros = []
    ext_kwargs = {}
    if use_cuda:
        ExtCls = cpp_ext.CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("FUSEDLOSS_WITH_CUDA", "1"))
        nvcc_flags = [
            "-O3",
            "--expt-relaxed-constexpr",
            "--fmad=false",  # as -ffp-contract=off for the C++ code
            "-lineinfo",
            f'-DFUSEDLOSS_TORCH_VERSION="{torch.__version__}"',
            "-Xptxas=-warn-spills",
        ]
        # The wheel's CUDA headers (cuBLAS, cuSPARSE, ...) are absent from some
        # toolkits; torch headers we include never need them, but add them when
        # present so a stray include still finds its file.
        for sp in sys.path:
            wheel_inc = os.path.join(sp, "nvidia", f"cu{torch.version.cuda.split('.')[0]}", "include")
            if os.path.isdir(wheel_inc):
                include_dirs.append(wheel_inc)
                break
        ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        ExtCls = cpp_ext.CppExtension
        ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags}

    ext = ExtCls(
        name="fusedloss._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=link_flags,
        **ext_kwargs,
    )

    info = {
        "version": version,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda": bool(use_cuda),
        "cuda_archs": archs.replace(" ", ";").split(";") if archs else [],
        "cuda_home": cuda_home if use_cuda else None,
        "openmp": True,
        "cpu_capability": cap,
    }
    with open(os.path.join(ROOT, "fusedloss", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")

    setup(
        version=version,
        ext_modules=[ext],
        cmdclass={"build_ext": cpp_ext.BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


main()
