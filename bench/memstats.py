"""Peak memory of the current process, as the benchmark scripts report it.

Shared by ``vs_torchvision.py`` (each worker's peak RSS and device memory)
and ``compile_memory.py`` (the fresh-process peak of one training step).
"""

import resource
import sys


def peak_rss_mb() -> float:
  """Peak resident set size of this process (MiB).

  Linux: ``VmHWM`` from ``/proc/self/status``, the high-water mark of this
  process's own address space. Not ``ru_maxrss``: Linux carries the
  parent's resident size at fork/exec into a child's ``ru_maxrss``, so a
  worker started by a large parent (``compile_memory.py --rss`` after it
  compiled a few models) reported at least the parent's size. Elsewhere
  ``ru_maxrss`` (KiB on Linux, bytes on macOS).
  """
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == 'darwin' else peak / 1024


def jax_device_peak_mb():
  """Peak memory in use on JAX's first device (MiB); None on the CPU.

  None too where the backend keeps no statistics (``memory_stats()`` is
  None, or has no ``peak_bytes_in_use``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return None
  stats = device.memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**20


def torch_device_peak_mb():
  """Peak CUDA memory PyTorch allocated (MiB); None without CUDA."""
  import torch  # pylint: disable=g-import-not-at-top
  if not torch.cuda.is_available():
    return None
  return torch.cuda.max_memory_allocated() / 2**20
