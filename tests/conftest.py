"""Test setup: without a GPU the Triton kernels run in the interpreter (must be set before import)."""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _lean_interpreter() -> None:
    """Triton's interpreter patches triton.language for a kernel's whole launch (GridExecutor), and then again
    at every device-function call inside it (InterpretedFunction.__call__ -> _patch_lang), ~2.5 ms a call:
    over half the time of the loss kernel's tests (its helpers are called per column block). The patch goes
    to the language modules that the function's globals name, and a device function's patch is never undone
    before the launch ends. So inside a launch, a function whose module's globals were patched already (the
    kernel's own module, or one patched by an earlier call) goes straight to its rewritten body; any other
    (Triton's own tl.zeros, in another module) is patched as before. Under a Triton whose call is not that
    shape, the interpreter is left as it is."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import inspect

        from triton.runtime import interpreter as ti
    except Exception:  # no Triton: the kernel tests skip or say so themselves
        return
    call = ti.InterpretedFunction.__call__
    try:
        src = inspect.getsource(call)
    except (OSError, TypeError):
        return
    if "_patch_lang(self.fn)" not in src or "self.rewrite()" not in src or not hasattr(ti, "GridExecutor"):
        return
    launch = ti.GridExecutor.__call__
    patched: list[dict] = []  # the globals whose language modules the running launch has patched

    def launched(self, *args, **kwargs):
        outer = list(patched)
        patched.append(self.fn.__globals__)
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched[:] = outer

    def device_call(self, *args, **kwargs):
        g = self.fn.__globals__
        if not patched or not any(g is p for p in patched):
            out = call(self, *args, **kwargs)
            if patched:
                patched.append(g)
            return out
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise ti.InterpreterError(repr(e)) from e

    ti.GridExecutor.__call__ = launched
    ti.InterpretedFunction.__call__ = device_call


_lean_interpreter()

# Under pytest-xdist each worker takes its share of the cores: torch's default (every core in each process)
# would oversubscribe them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


# The trainer on CPU, on the digits set and the smallest CIFAR ResNet (ResNet-8: every split point and
# shortcut kind of ResNet-32 with one block a stage, a third of its time): what most end-to-end tests
# start from. Tests of the paper's own network name resnet32.
CPU_ARCH = "resnet8"
CPU_DIGITS = ["digits", "--device", "cpu", "--arch", CPU_ARCH]


@pytest.fixture(scope="module")
def built_extension():
    """The C++ extension compiled once per module, before any test (and before DDP workers start)."""
    from collab_fast import extension

    extension.load_extension()


HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="needs DALI (pip install 'collab_fast[dali]')")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy image folder, 3 classes of 7 training and 3 validation 40x30 JPEGs (write_toy's generator)."""
    from collab_fast.data import write_toy

    return write_toy(tmp_path_factory.mktemp("toy"), classes=3, per_class=7, size="40x30", val_per_class=3)
