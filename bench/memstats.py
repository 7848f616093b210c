"""Peak memory of the current process, as the benchmark scripts report it.

Shared by ``vs_torchvision.py`` (each worker's peak RSS and device memory)
and ``compile_memory.py`` (the fresh-process peak of one training step).
"""

import resource


def peak_rss_mb() -> float:
  """Peak resident set size of this process (MiB; Linux ``ru_maxrss``)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
