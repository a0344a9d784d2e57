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
    CUDA_HOME                     CUDA toolkit root (default: resolved from nvcc on PATH,
                                  then NVIDIA's compiler wheels in this environment, then
                                  /usr/local/cuda*)
    MAX_JOBS                      parallel compile jobs

Only building the extension needs torch: sdist, egg_info and dist_info work
without it, and none of them writes into the source tree.
"""

import atexit
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext
from setuptools.command.egg_info import egg_info as _setuptools_egg_info
from setuptools.command.sdist import sdist as _setuptools_sdist

ROOT = os.path.dirname(os.path.abspath(__file__))
# Short on purpose: every arch multiplies nvcc time (~35 s per .cu per arch on
# 2 cores). sm_80 SASS also runs on Ampere/Ada; compute_90 PTX JITs on newer GPUs.
FUSEDLOSS_DEFAULT_ARCHS = "8.0;9.0+PTX"

try:
    import torch
except ImportError:
    torch = None

NO_TORCH = (
    "fusedloss is compiled against the torch in your environment, and none "
    "was found.\nInstall torch first, then build without build isolation:\n"
    "    pip install torch ninja\n"
    "    pip install --no-build-isolation .\n"
)
REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _version():
    ns = {}
    with open(os.path.join(ROOT, "fusedloss", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


# ---------------------------------------------------------------------------
# CUDA toolkit discovery
# ---------------------------------------------------------------------------


@dataclass
class Toolkit:
    """What torch.utils.cpp_extension needs to compile and link the CUDA kernels."""

    home: str  # CUDA_HOME: holds bin/nvcc and include/
    cudart: str = "cudart"  # the -l name of the CUDA runtime
    library_dirs: list = field(default_factory=list)  # beyond home/lib64 or home/lib


def _cudart_in(libdir):
    """The -l name of the libcudart in libdir, or None.

    NVIDIA's wheels ship only the versioned libcudart.so.13, which a plain
    -lcudart does not find; GNU ld links it as -l:libcudart.so.13."""
    if os.path.exists(os.path.join(libdir, "libcudart.so")):
        return "cudart"
    versioned = sorted(glob.glob(os.path.join(libdir, "libcudart.so.[0-9]*")), key=len)
    return ":" + os.path.basename(versioned[0]) if versioned else None


def _system_toolkit(root):
    """A toolkit installed the classic way: root/bin/nvcc and a libcudart under root."""
    if not root or not os.path.isfile(os.path.join(root, "bin", "nvcc")):
        return None
    for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        cudart = _cudart_in(os.path.join(root, lib))
        if cudart:
            return Toolkit(root, cudart, [os.path.join(root, lib)])
    return None


def _toolkit_root_from_nvcc(nvcc):
    """The real toolkit root behind `nvcc`, which may be a wrapper script.

    torch derives CUDA_HOME from the parent of nvcc's folder; when nvcc is a
    wrapper (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc) that
    folder has no libcudart and linking fails with `cannot find -lcudart`. nvcc's
    dry run prints the folder of the real binary.
    """
    real = os.path.realpath(nvcc)
    cand = os.path.dirname(os.path.dirname(real))
    if _system_toolkit(cand):
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
        if _system_toolkit(cand):
            return cand
    return None


def _cudart_major(include_dir):
    try:
        with open(os.path.join(include_dir, "cuda_runtime_api.h")) as f:
            m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", f.read())
    except OSError:
        return None
    return int(m.group(1)) // 1000 if m else None


def pip_toolkit_command(torch_cuda):
    """The pip line that installs nvcc and its headers matching torch's CUDA version."""
    return f'pip install "cuda-toolkit[nvcc,cccl]=={torch_cuda}.*"'


def pypi_toolkit(site_dirs, cuda_major):
    """nvcc installed from PyPI next to torch, as (Toolkit or None, why not).

    From CUDA 13 on, NVIDIA's wheels (nvidia-cuda-nvcc, -crt, -cccl, nvidia-nvvm,
    nvidia-cuda-runtime; `pip install "cuda-toolkit[nvcc,cccl]==13.0.*"`) all
    unpack into site-packages/nvidia/cu13/, laid out like a toolkit: bin/nvcc,
    nvvm/, include/ (crt/ and cccl/ inside), lib/libcudart.so.13. Its
    nvcc.profile finds everything relative to bin/, so that folder is CUDA_HOME.
    CUDA 12's wheels have no nvcc binary (only ptxas), so there is nothing to find.
    """
    wanted = {
        "bin/nvcc": "nvidia-cuda-nvcc",
        "nvvm/bin/cicc": "nvidia-nvvm",
        "include/crt/host_config.h": "nvidia-cuda-crt",
        "include/cccl/nv/target": "nvidia-cuda-cccl",
        "include/cuda_runtime_api.h": "nvidia-cuda-runtime",
    }
    for sp in site_dirs:
        home = os.path.join(sp, "nvidia", f"cu{cuda_major}")
        if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
            continue
        missing = [pkg for path, pkg in wanted.items() if not os.path.exists(os.path.join(home, path))]
        cudart = _cudart_in(os.path.join(home, "lib"))
        if cudart is None:
            missing.append("nvidia-cuda-runtime (libcudart)")
        if missing:
            return None, f"{home}/bin/nvcc is installed but {', '.join(missing)} is not"
        major = _cudart_major(os.path.join(home, "include"))
        if major != cuda_major:
            return None, f"{home} holds CUDA {major} headers, not CUDA {cuda_major}"
        return Toolkit(home, cudart, [os.path.join(home, "lib")]), None
    return None, None


def _site_dirs():
    """Where pip put torch and its nvidia-* wheels: torch's own site dir first."""
    dirs = [os.path.dirname(os.path.dirname(torch.__file__))] + [p for p in sys.path if os.path.isdir(p)]
    return list(dict.fromkeys(os.path.abspath(p) for p in dirs))


def _find_toolkit(cuda_major):
    """The toolkit to build with, and notes on candidates that were rejected."""
    notes = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            tk = _system_toolkit(root)
            if tk:
                return tk, notes
            notes.append(f"{var}={root} has no bin/nvcc with a libcudart beside it")
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root_from_nvcc(nvcc)
        if root:
            return _system_toolkit(root), notes
        notes.append(f"{nvcc} is on PATH but no libcudart was found in its toolkit (set CUDA_HOME)")
    # Wheels in this environment before a guess at /usr/local/cuda, which may
    # hold another CUDA major than torch's.
    tk, why_not = pypi_toolkit(_site_dirs(), cuda_major)
    if tk:
        return tk, notes
    if why_not:
        notes.append(why_not)
    for root in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        tk = _system_toolkit(root)
        if tk:
            return tk, notes
    return None, notes


@dataclass
class CudaPlan:
    toolkit: object = None  # Toolkit when the CUDA kernels are built
    skipped: str = None  # why they are not
    hint: str = None  # what gets them
    loud: bool = True  # torch has CUDA, so the skip matters to the user


def cuda_plan(flag, torch_version, torch_cuda, find=_find_toolkit):
    """Whether and with what the CUDA kernels are built (FUSEDLOSS_CUDA=flag)."""
    flag = (flag or "").strip().lower()
    rebuild = f"    {REBUILD}    # in the fusedloss source folder"
    if flag in ("0", "false", "off", "no"):
        return CudaPlan(
            skipped=f"FUSEDLOSS_CUDA={flag} was set",
            hint=f"unset FUSEDLOSS_CUDA and rebuild:\n{rebuild}",
            loud=torch_cuda is not None,
        )
    if torch_cuda is None:
        plan = CudaPlan(
            skipped=f"torch {torch_version} is a CPU-only build",
            hint=f"install a CUDA build of torch (`pip install torch` on Linux x86-64), then rebuild:\n{rebuild}",
            loud=False,
        )
    else:
        major = int(torch_cuda.split(".")[0])
        toolkit, notes = find(major)
        if toolkit is not None:
            return CudaPlan(toolkit=toolkit)
        if major >= 13:
            get = (
                f"install NVIDIA's CUDA compiler from PyPI (or set CUDA_HOME to a CUDA {major} toolkit) "
                f"and rebuild:\n    {pip_toolkit_command(torch_cuda)}\n"
            )
        else:
            get = f"set CUDA_HOME to a CUDA {major} toolkit (CUDA {major}'s wheels have no nvcc) and rebuild:\n"
        plan = CudaPlan(
            skipped="; ".join([f"torch {torch_version} uses CUDA {torch_cuda}, but no nvcc for it was found", *notes]),
            hint=get + rebuild,
        )
    if flag in ("1", "true", "on", "yes"):
        sys.exit(f"FUSEDLOSS_CUDA={flag}, but the CUDA kernels cannot be built: {plan.skipped}.\nTo fix, {plan.hint}")
    return plan


def skip_message(plan):
    bar = "!" * 78
    return (
        f"\n{bar}\n"
        "fusedloss: CUDA kernels NOT built. This build runs on the CPU only;\n"
        "CUDA tensors will not use fusedloss's kernels.\n"
        f"  why: {plan.skipped}.\n"
        f"  to get them, {plan.hint}\n"
        f"{bar}\n"
    )


def _shout(message):
    """Make sure a person building fusedloss sees `message`.

    pip hides a build's output unless -v is given; pip >= 25 does show warnings
    raised by the build backend, older pips (the one in a fresh venv) do not.
    So under a PEP 517 frontend whose output is not a terminal, also write to
    the controlling terminal when there is one; stderr keeps it in -v logs.
    """
    # Set by pyproject-hooks, which pip and build run the backend with (the
    # second name in older ones, as in pip 23).
    under_frontend = any(v in os.environ for v in ("_PYPROJECT_HOOKS_BUILD_BACKEND", "PEP517_BUILD_BACKEND"))
    if under_frontend and not sys.stderr.isatty():
        try:
            with open("/dev/tty", "w") as tty:
                tty.write(message)
            sys.stderr.write(message)
            return
        except OSError:
            pass  # no terminal (CI, a pipe): warnings reach the log
    warnings.warn(message, stacklevel=2)


# ---------------------------------------------------------------------------
# GPU architectures and CPU instruction sets
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# The extension, configured when it is built
# ---------------------------------------------------------------------------


def configure_extension(plan, version):
    """The fusedloss._C Extension and the build_info record for `plan`."""
    import torch.utils.cpp_extension as cpp_ext

    toolkit = plan.toolkit
    if toolkit:
        # cpp_extension resolved CUDA_HOME on import, from the wrapper's folder
        # or not at all; nvcc subprocesses read the environment.
        os.environ["CUDA_HOME"] = toolkit.home
        cpp_ext.CUDA_HOME = toolkit.home
        archs = _arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    else:
        archs = ""

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
    if toolkit:
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
        for sp in _site_dirs():
            wheel_inc = os.path.join(sp, "nvidia", f"cu{torch.version.cuda.split('.')[0]}", "include")
            if os.path.isdir(wheel_inc):
                include_dirs.append(wheel_inc)
                break
        ext = cpp_ext.CUDAExtension(
            name="fusedloss._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            library_dirs=list(toolkit.library_dirs),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
        ext.libraries = [toolkit.cudart if lib == "cudart" else lib for lib in ext.libraries]
    else:
        ext = cpp_ext.CppExtension(
            name="fusedloss._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )

    info = {
        "version": version,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda": toolkit is not None,
        "cuda_archs": archs.replace(" ", ";").split(";") if archs else [],
        "cuda_home": toolkit.home if toolkit else None,
        "cuda_skipped_reason": plan.skipped,
        "cuda_enable_hint": plan.hint,
        "openmp": True,
        "cpu_capability": cap,
    }
    return ext, info


def _write_build_info(info, package_dir):
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, "_build_info.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")


if torch is not None:
    # cpp_extension guesses a CUDA_HOME on import and, with no GPU visible, logs
    # it: often the nvcc wrapper's folder. The toolkit is chosen in
    # build_ext.run instead, so that guess only misleads.
    _cpp_log = logging.getLogger("torch.utils.cpp_extension")
    _level = _cpp_log.level
    _cpp_log.setLevel(logging.ERROR)
    import torch.utils.cpp_extension as _cpp_ext

    _cpp_log.setLevel(_level)
    _BuildExtension = _cpp_ext.BuildExtension.with_options(use_ninja=True)
else:
    _BuildExtension = _setuptools_build_ext


class build_ext(_BuildExtension):
    """Decides what to build only when the extension is built, so that sdist and
    metadata commands need no torch and probe no toolkit, and records the
    decision in _build_info.json next to the compiled module."""

    def run(self):
        if torch is None:
            sys.exit(NO_TORCH)
        version = _version()
        plan = cuda_plan(os.environ.get("FUSEDLOSS_CUDA"), torch.__version__, torch.version.cuda)
        ext, info = configure_extension(plan, version)
        (placeholder,) = self.extensions
        # Same object: setuptools finalized it (full name, stub flags) already.
        placeholder.__dict__.update({k: v for k, v in vars(ext).items() if not k.startswith("_")})
        if plan.toolkit:
            print(f"fusedloss: compiling the CUDA kernels for {info['cuda_archs']} with {plan.toolkit.home}/bin/nvcc")
        super().run()
        # Into the build output, whence the wheel takes it; with --inplace or
        # an editable install the package in the source tree is the output too.
        _write_build_info(info, os.path.join(self.build_lib, "fusedloss"))
        if self.inplace:
            _write_build_info(info, self.get_finalized_command("build_py").get_package_dir("fusedloss"))
        if plan.skipped:
            message = skip_message(plan)
            if plan.loud:
                _shout(message)
            else:
                sys.stderr.write(message)


_SCRATCH = []


def _scratch_dir():
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="fusedloss-egg-info-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


class egg_info(_setuptools_egg_info):
    """fusedloss.egg-info goes to a scratch folder, not the source tree, unless a
    folder is given (pip's dist_info, and --egg-base, give one)."""

    def finalize_options(self):
        if self.egg_base is None:
            self.egg_base = _scratch_dir()
        super().finalize_options()


class sdist(_setuptools_sdist):
    """setuptools puts the egg-info in the archive by its path, which is now
    outside the tree: copy it to the top of the release tree instead."""

    def make_release_tree(self, base_dir, files):
        egg_info_dir = self.get_finalized_command("egg_info").egg_info
        super().make_release_tree(base_dir, [f for f in files if not os.path.isabs(f)])
        if os.path.isabs(egg_info_dir):
            dest = os.path.join(base_dir, os.path.basename(egg_info_dir))
            shutil.copytree(egg_info_dir, dest)
            sources = os.path.join(dest, "SOURCES.txt")
            with open(sources) as f:
                listed = f.read().replace(os.path.dirname(egg_info_dir) + os.sep, "")
            with open(sources, "w") as f:
                f.write(listed)


def main():
    setup(
        version=_version(),
        # A placeholder, configured by build_ext.run: the kernels to compile
        # depend on torch and the toolkit, which sdist must not need.
        ext_modules=[Extension("fusedloss._C", sources=["csrc/ops.cpp"])],
        cmdclass={"build_ext": build_ext, "egg_info": egg_info, "sdist": sdist},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
