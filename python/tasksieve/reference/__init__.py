"""Pure-PyTorch references of the tasksieve ops: the ground truth for tests and benchmarks.

Written for clarity, not speed: every op is the literal formula of its contract in
``csrc/ops.cpp``, in fp32 (or fp64 when asked) on whatever device the inputs live on. The
argument checks mirror the C++ ones (same argument names, ``RuntimeError`` like ``TORCH_CHECK``),
so a test can hold the kernels' error messages against these.

One module per op family (windowkv, flexprefill, premoe). The package needs nothing but torch:
it imports neither the compiled extension nor transformers nor any tasksieve method, and the
index arithmetic it needs is written here again from the papers, so the ground truth never
shares code with what it checks. Only tests and benchmarks import it.
"""

from .flexprefill import *  # noqa: F401,F403
from .flexprefill import __all__ as _flexprefill_all
from .premoe import *  # noqa: F401,F403
from .premoe import __all__ as _premoe_all
from .windowkv import *  # noqa: F401,F403
from .windowkv import __all__ as _windowkv_all

__all__ = _windowkv_all + _flexprefill_all + _premoe_all
