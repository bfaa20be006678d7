"""Kernel tests: one switch for Pallas interpret mode, as in jax's own Pallas tests.

``FLAXSEED_INTERPRET`` chooses how the Pallas kernels (``pallas_tpu``, ``pallas_gpu``) run:

* ``1``: in interpret mode (``interpret=True``: the TPU interpreter for ``pallas_tpu``, the
  Pallas interpreter for ``pallas_gpu``), on any backend;
* ``0``: compiled, for the backend jax runs on (Mosaic on a TPU, Triton on a GPU);
* unset (or empty): interpret exactly when ``jax.default_backend() == "cpu"``.

Anything else is a usage error. Tests read it through the session fixture ``interpret`` (a bool,
passed as the kernels' ``interpret=``) and call ``require_backend(implementation)`` before
running a kernel: when not interpreting, a ``pallas_tpu`` kernel runs only on a TPU and a
``pallas_gpu`` one only on a GPU, so the test skips elsewhere (the XLA implementations always
run). Tests of the interpreters themselves (``interpret="generic"`` against the TPU
interpreter) skip when not interpreting.

Examples::

  python -m pytest -q tests/kernels                          # CPU: interpreted
  FLAXSEED_INTERPRET=0 python -m pytest -q tests/kernels     # CPU: only the XLA paths run
  JAX_PLATFORMS=cuda python -m pytest -q tests/kernels       # GPU: compiled (Triton)
  JAX_PLATFORMS=tpu python -m pytest -q tests/kernels        # TPU: compiled (Mosaic)

``tests/conftest.py`` defaults ``JAX_PLATFORMS`` to ``cpu``: set it (``cuda``, ``tpu``) to test
on an accelerator. ``test_kernel_lowering.py`` does not use the switch: it compiles ahead of time
for TPU topologies (libtpu) and lowers to Triton from any machine.
"""

import os

import jax
import pytest

ENV = "FLAXSEED_INTERPRET"
_SETTING = os.environ.get(ENV, "")
if _SETTING not in ("", "0", "1"):
  raise pytest.UsageError(
    f"{ENV}={_SETTING!r}: use 1 (interpret), 0 (compiled) or leave it "
    "unset (interpret on the CPU backend only)"
  )

# The backend a Pallas implementation compiles for (the XLA implementations run anywhere).
_PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}


def interpret_mode() -> bool:
  """Whether the Pallas kernels run in interpret mode (see the module docstring)."""
  if _SETTING:
    return _SETTING == "1"
  return jax.default_backend() == "cpu"


@pytest.fixture(scope="session")
def interpret() -> bool:
  """``interpret=`` for the Pallas kernels: ``FLAXSEED_INTERPRET``, by default the CPU backend."""
  return interpret_mode()


@pytest.fixture(scope="session")
def require_backend(interpret):  # pylint: disable=redefined-outer-name
  """``require_backend(implementation)``: skip the test unless ``implementation`` can run here,
  i.e. unless it is interpreted, or not a Pallas kernel, or a Pallas kernel for this backend."""

  def check(implementation: str) -> None:
    platform = _PLATFORM.get(implementation)
    if interpret or platform is None:
      return
    backend = jax.default_backend()
    if platform != backend:
      pytest.skip(
        f"{implementation} runs compiled only on {platform.upper()}; the backend is "
        f"{backend} and {ENV}={_SETTING or 'unset'} (set {ENV}=1 to interpret)"
      )

  return check
