"""The build: what it records, and the clear errors for a mismatched one."""

import importlib.util
import os
import subprocess
import sys
import tarfile

import pytest
import torch

import fusedloss
from conftest import OUTSIDE_SOURCE
from fusedloss import _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_keys_and_values():
    info = fusedloss.build_info()
    assert info["version"] == fusedloss.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert info["openmp"] is True
    if info["cuda"]:
        assert info["cuda_archs"] and all(a[0].isdigit() for a in info["cuda_archs"])
    info["version"] = "changed"
    assert fusedloss.build_info()["version"] == fusedloss.__version__  # a copy


def test_version_mismatch_message():
    with pytest.raises(ImportError) as e:
        _ops.check_torch_version("2.11.0+cu130", "2.14.1+cu130")
    msg = str(e.value)
    assert "2.11.0+cu130" in msg and "2.14.1+cu130" in msg and "pip install --no-build-isolation" in msg


def test_import_under_another_torch_raises_importerror():
    # A real import with the running torch pretending to be another version.
    code = "import torch; torch.__version__ = '9.9.9'; import fusedloss"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=OUTSIDE_SOURCE)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "9.9.9" in r.stderr and torch.__version__ in r.stderr
    assert "Segmentation" not in r.stderr


def test_cpu_capability_check():
    _ops.check_cpu_capability("DEFAULT")  # always loadable
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if "avx512f" not in flags:
        with pytest.raises(ImportError, match="AVX512"):
            _ops.check_cpu_capability("AVX512")
    else:
        _ops.check_cpu_capability("AVX512")


def test_cpu_buffer_cache_reuses_and_empties():
    ops = torch.ops.fusedloss
    fusedloss.empty_cpu_cache()
    x = torch.randn(1 << 20)
    y = torch.rand(1 << 20)
    g = torch.ones(())
    gx, _ = ops.bce_with_logits_backward(g, x, y, None, None, 1, [True, False])
    ptr = gx.data_ptr()
    del gx
    assert fusedloss.cpu_cache_bytes() >= 4 << 20
    gx2, _ = ops.bce_with_logits_backward(g, x, y, None, None, 1, [True, False])
    assert gx2.data_ptr() == ptr
    expected, _ = ops.bce_with_logits_backward(g, x.clone(), y, None, None, 1, [True, False])
    assert torch.equal(gx2, expected)
    del gx2, expected
    fusedloss.empty_cpu_cache()
    assert fusedloss.cpu_cache_bytes() == 0


# ---------------------------------------------------------------------------
# Packaging: the source distribution and setup.py's toolkit discovery. These
# need the source tree (a clone or an unpacked sdist), not just the package.
# ---------------------------------------------------------------------------


def _need_source_tree():
    if not os.path.exists(os.path.join(ROOT, "setup.py")) or not os.path.exists(os.path.join(ROOT, "MANIFEST.in")):
        pytest.skip("not run from a fusedloss source tree")


def _tree_snapshot():
    """Every path in the source tree with its mtime, less git's, a venv's and bytecode caches."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", "__pycache__")]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            snap[os.path.relpath(path, ROOT)] = os.lstat(path).st_mtime_ns
    return snap


def test_sdist_has_every_source_and_leaves_the_tree_alone(tmp_path):
    _need_source_tree()
    before = _tree_snapshot()
    # FUSEDLOSS_CUDA=1 would make a build fail without nvcc: sdist must not build or probe.
    env = {**os.environ, "FUSEDLOSS_CUDA": "1", "CUDA_HOME": "/nonexistent"}
    r = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert _tree_snapshot() == before, "setup.py sdist wrote into the source tree"

    (archive,) = tmp_path.glob("fusedloss-*.tar.gz")
    with tarfile.open(archive) as tar:
        top = archive.name[: -len(".tar.gz")] + "/"
        names = {m.name[len(top) :] for m in tar.getmembers() if m.isfile()}
    expected = {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "requirements.txt", "PKG-INFO"}
    for folder, suffixes in [
        ("csrc", ("",)),  # every file, whatever its kind
        ("fusedloss", (".py",)),
        ("tests", (".py",)),
        ("bench", (".py", ".sh")),
        ("examples", (".py",)),
    ]:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            expected |= {os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames if f.endswith(suffixes)}
    assert "tests/conftest.py" in expected and any(n.endswith(".cu") for n in expected)
    assert expected - names == set()
    assert not {n for n in names if n.endswith((".so", ".o", ".pyc")) or n.endswith("_build_info.json")}


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: its functions, without running setup()."""
    _need_source_tree()
    spec = importlib.util.spec_from_file_location("fusedloss_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_cuda_wheels(site, major=13, cudart_version=None, skip=()):
    """site-packages/nvidia/cu<major>/ as NVIDIA's nvcc, nvvm, crt, cccl and runtime wheels lay it out."""
    home = site / "nvidia" / f"cu{major}"
    files = {
        "bin/nvcc": "#!/bin/sh\n",
        "nvvm/bin/cicc": "",
        "include/crt/host_config.h": "",
        "include/cccl/nv/target": "",
        "include/cuda_runtime_api.h": f"#define CUDART_VERSION {cudart_version or major * 1000}\n",
        f"lib/libcudart.so.{major}": "",
    }
    for rel, text in files.items():
        if rel in skip:
            continue
        path = home / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return home


def test_pypi_nvcc_is_found_next_to_torch(setup_py, tmp_path):
    home = _fake_cuda_wheels(tmp_path / "site")
    toolkit, why_not = setup_py.pypi_toolkit([str(tmp_path / "elsewhere"), str(tmp_path / "site")], 13)
    assert why_not is None
    assert toolkit.home == str(home)
    # Only libcudart.so.13 is shipped: -lcudart would not find it.
    assert toolkit.cudart == ":libcudart.so.13" and toolkit.library_dirs == [str(home / "lib")]
    (home / "lib" / "libcudart.so").write_text("")
    assert setup_py.pypi_toolkit([str(tmp_path / "site")], 13)[0].cudart == "cudart"


@pytest.mark.parametrize(
    "missing, package",
    [
        ("include/crt/host_config.h", "nvidia-cuda-crt"),
        ("include/cccl/nv/target", "nvidia-cuda-cccl"),
        ("nvvm/bin/cicc", "nvidia-nvvm"),
        ("lib/libcudart.so.13", "libcudart"),
    ],
)
def test_pypi_nvcc_with_a_missing_part_is_refused(setup_py, tmp_path, missing, package):
    _fake_cuda_wheels(tmp_path, skip=(missing,))
    toolkit, why_not = setup_py.pypi_toolkit([str(tmp_path)], 13)
    assert toolkit is None and package in why_not


def test_pypi_nvcc_of_another_cuda_major_is_not_used(setup_py, tmp_path):
    _fake_cuda_wheels(tmp_path, major=13)
    assert setup_py.pypi_toolkit([str(tmp_path)], 12) == (None, None)
    _fake_cuda_wheels(tmp_path / "mixed", major=13, cudart_version=12080)
    toolkit, why_not = setup_py.pypi_toolkit([str(tmp_path / "mixed")], 13)
    assert toolkit is None and "CUDA 12" in why_not


def test_cuda_plan_says_why_the_kernels_are_skipped(setup_py):
    def nothing(major):
        return None, [f"looked for CUDA {major}"]

    plan = setup_py.cuda_plan("", "2.14.1+cu130", "13.0", find=nothing)
    assert plan.toolkit is None and plan.loud
    assert "no nvcc" in plan.skipped and "looked for CUDA 13" in plan.skipped
    assert 'pip install "cuda-toolkit[nvcc,cccl]==13.0.*"' in plan.hint
    message = setup_py.skip_message(plan)
    assert "CUDA kernels NOT built" in message and plan.skipped in message and plan.hint in message

    plan = setup_py.cuda_plan("0", "2.14.1+cu130", "13.0", find=nothing)
    assert plan.toolkit is None and plan.loud and "FUSEDLOSS_CUDA=0" in plan.skipped

    plan = setup_py.cuda_plan("", "2.13.0+cpu", None, find=nothing)
    assert plan.toolkit is None and not plan.loud and "CPU-only" in plan.skipped

    with pytest.raises(SystemExit, match=r"cuda-toolkit\[nvcc,cccl\]==13\.0\.\*"):
        setup_py.cuda_plan("1", "2.14.1+cu130", "13.0", find=nothing)

    found = setup_py.Toolkit("/opt/cuda")
    plan = setup_py.cuda_plan("1", "2.14.1+cu130", "13.0", find=lambda major: (found, []))
    assert plan.toolkit is found and plan.skipped is None


def test_build_info_says_why_cuda_was_skipped():
    info = fusedloss.build_info()
    if info["cuda"]:
        assert info["cuda_skipped_reason"] is None
    else:
        assert info["cuda_skipped_reason"] and info["cuda_enable_hint"]
