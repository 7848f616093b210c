"""The XLA_FLAGS helpers the suite and its subprocesses use."""

from tests import xla_env


def test_cpu_devices_keeps_other_flags_and_replaces_the_count():
  base = {'XLA_FLAGS': '--xla_foo=1 --xla_force_host_platform_device_count=2 '
                       + xla_env.FAST_COMPILE, 'OTHER': 'x'}
  env = xla_env.cpu_devices(8, base=base)
  assert env['XLA_FLAGS'].split() == [
      '--xla_foo=1', xla_env.FAST_COMPILE,
      '--xla_force_host_platform_device_count=8']
  assert env['JAX_PLATFORMS'] == 'cpu' and env['OTHER'] == 'x'
  assert base['XLA_FLAGS'].endswith(xla_env.FAST_COMPILE)   # not modified
  optimized = xla_env.cpu_devices(8, optimized=True, base=base)
  assert optimized['XLA_FLAGS'].split() == [
      '--xla_foo=1', '--xla_force_host_platform_device_count=8']


def test_fast_compile_leaves_a_chosen_level_alone():
  assert xla_env.with_fast_compile({}) == xla_env.FAST_COMPILE
  assert (xla_env.with_fast_compile({'XLA_FLAGS': '--xla_foo=1'})
          == '--xla_foo=1 ' + xla_env.FAST_COMPILE)
  assert xla_env.with_fast_compile(
      {'XLA_FLAGS': '--xla_backend_optimization_level=2'}) is None
