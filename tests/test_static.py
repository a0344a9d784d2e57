"""Static checks of the CUDA sources: every kernel launch is on the current
stream and followed by a launch check (torch's own rule for its kernels). And
of the tests themselves: no assertion that cannot fail, no wall-clock timing."""

import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(
    glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh"))
)
TEST_SOURCES = sorted(glob.glob(os.path.join(ROOT, "tests", "*.py")))


def test_there_are_cuda_sources():
    assert any(p.endswith(".cu") for p in CUDA_SOURCES)


def test_every_launch_is_checked_and_on_the_current_stream():
    from torch.testing._internal.check_kernel_launches import check_code_for_cuda_kernel_launches

    launches = 0
    for path in CUDA_SOURCES:
        with open(path) as f:
            code = f.read()
        assert check_code_for_cuda_kernel_launches(code, path) == 0, path
        for m in re.finditer(r"<<<([^>]*)>>>", code):
            launches += 1
            params = [p.strip() for p in m.group(1).split(",")]
            assert len(params) == 4 and "getCurrentCUDAStream" in params[3] or params[3] == "stream", (path, m.group(0))
            if params[3] == "stream":
                before = code[: m.start()]
                assert re.search(r"stream\s*=\s*c10::cuda::getCurrentCUDAStream\(\)", before), (path, m.group(0))
    assert launches > 0


def test_cuda_sources_avoid_headers_that_need_cusparse():
    # ATen/cuda/CUDAContext.h pulls in cusparse.h, which some toolkits lack.
    for path in CUDA_SOURCES:
        with open(path) as f:
            assert "ATen/cuda/CUDAContext.h" not in f.read(), path


def test_cuda_code_has_no_float_atomics():
    # Reductions must be deterministic: partial sums, never atomicAdd on floats.
    for path in CUDA_SOURCES:
        with open(path) as f:
            assert "atomicAdd" not in f.read(), path


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _vacuous_asserts(source):
    """Asserts of a true constant expression, and `assert x is not None` where
    that is the only use of x: a check of a value nothing else needs, left
    behind when the code that used it went."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert) and not any(
            isinstance(n, (ast.Name, ast.Call, ast.Attribute, ast.Subscript)) for n in ast.walk(node.test)
        ):
            if eval(compile(ast.Expression(node.test), "<assert>", "eval"), {"__builtins__": {}}):
                found.append((node.lineno, ast.unparse(node)))
    for fn in _functions(tree):
        loads = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                loads.setdefault(node.id, []).append(node)
        for node in ast.walk(fn):
            test = node.test if isinstance(node, ast.Assert) else None
            if (
                isinstance(test, ast.Compare)
                and isinstance(test.left, ast.Name)
                and len(test.ops) == 1
                and isinstance(test.ops[0], ast.IsNot)
                and isinstance(test.comparators[0], ast.Constant)
                and test.comparators[0].value is None
                and loads.get(test.left.id) == [test.left]
            ):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_tests_have_no_assertions_that_cannot_fail():
    offenders = []
    for path in TEST_SOURCES:
        with open(path) as f:
            offenders += [(os.path.basename(path), *hit) for hit in _vacuous_asserts(f.read())]
    assert not offenders, offenders


def test_the_vacuous_assert_check_itself():
    code = (
        "def f():\n    x = g()\n    assert x is not None\n\n"
        "def h():\n    y = g()\n    assert y is not None\n    use(y)\n"
    )
    assert [line for line, _ in _vacuous_asserts(code)] == [3]
    consts = "assert True\nassert 1 == 1\nassert False\nassert x == 1\n"
    assert [line for line, _ in _vacuous_asserts(consts)] == [1, 2]


def test_tests_do_not_time_anything():
    # Timings are noisy on shared machines and belong in the benchmarks; this
    # also covers code the tests run in subprocesses, hence a text search.
    clock = re.compile(r"\b(perf_counter|monotonic|process_time|timeit)\b|\btime\.time\(")
    offenders = []
    for path in TEST_SOURCES:
        if os.path.samefile(path, __file__):
            continue
        with open(path) as f:
            offenders += [(os.path.basename(path), i) for i, line in enumerate(f, 1) if clock.search(line)]
    assert not offenders, offenders
