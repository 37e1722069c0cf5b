"""Suite-wide settings, read before any test module imports jax.

XLA's persistent compilation cache in a directory of this session only: many tests compile the
same computation again (a training step in each process of a kill-and-resume test, the main
job's second run, the notebooks and README blocks), and with the cache each is compiled once.
The directory is new for every session, so the suite's time is what a clean clone sees, and
it is removed at the end. Subprocesses inherit it through the environment. Set
JAX_COMPILATION_CACHE_DIR yourself to choose another (it is then kept).
"""

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="grassq-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
