"""Compiler options: what each backend gets, the overrides, and that jitted model code uses them.

Also the performance options' record: validation, the environment, the dict.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import models, train
from jaxprune.errors import ConfigError
from jaxprune.kernels import compiler
from jaxprune.kernels.options import PerformanceOptions

on_cpu = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='CPU options only')


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)


@on_cpu
def test_cpu_gets_reductions_only_library_fusions():
  assert compiler.compiler_options() == {
      'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}


@on_cpu
def test_programs_that_run_once_also_get_a_lower_optimisation_level(monkeypatch):
  assert compiler.compiler_options(once=True) == {
      'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE',
      'xla_backend_optimization_level': 1}
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=3')
  assert compiler.compiler_options(once=True) == {
      'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}
  assert compiler.compiler_options('gpu', once=True) == {}


def test_other_backends_get_no_options():
  for backend in ('gpu', 'tpu', 'cuda', 'rocm'):
    assert compiler.compiler_options(backend) == {}


def test_the_xla_option_set_passes_no_options():
  assert compiler.compiler_options('cpu', xla_options='xla') == {}
  assert compiler.compiler_options('cpu', once=True, xla_options='xla') == {}


def test_the_users_xla_flags_win(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type= --foo=1')
  assert compiler.compiler_options('cpu') == {}


def test_an_unknown_option_set_is_a_config_error_as_a_setting_and_a_bug_as_an_argument():
  with pytest.raises(ConfigError, match=r"^unknown xla_options 'fast'; choose one of: jaxprune, "
                                        r"xla\.$") as error:
    PerformanceOptions(xla_options='fast')
  assert error.value.settings == ('xla_options',)
  with pytest.raises(ValueError, match='jaxprune, xla') as error:
    compiler.jit(lambda x: x, xla_options='fast')
  assert not isinstance(error.value, ConfigError)


def test_performance_options_from_the_environment():
  assert PerformanceOptions.from_env({}) == PerformanceOptions()
  assert PerformanceOptions().as_dict() == {
      'conv_impl': 'auto', 'batch_norm': 'jaxprune', 'xla_options': 'jaxprune'}
  options = PerformanceOptions.from_env(
      {'JAXPRUNE_CONV_IMPL': ' Native', 'JAXPRUNE_BATCH_NORM': '', 'JAXPRUNE_XLA_OPTIONS': 'xla'})
  assert options.as_dict() == {'conv_impl': 'native', 'batch_norm': 'jaxprune',
                               'xla_options': 'xla'}
  # What the user typed is the variable, so the message names it (and no setting).
  with pytest.raises(ConfigError, match=r"^unknown JAXPRUNE_BATCH_NORM 'cudnn'; choose one of: "
                                        r"flax, jaxprune\.$") as error:
    PerformanceOptions.from_env({'JAXPRUNE_BATCH_NORM': 'cudnn'})
  assert error.value.settings == ()


def test_an_option_this_jaxlib_does_not_know_is_dropped(monkeypatch):
  assert not compiler._accepted((('xla_cpu_no_such_option_jaxprune', 'true'),))
  monkeypatch.setattr(compiler, 'CPU_OPTIONS', {'xla_cpu_no_such_option_jaxprune': 'true'})
  assert compiler.compiler_options('cpu') == {}


@on_cpu
def test_jit_with_options_computes_the_same_values():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
  k = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))

  def loss(k, x):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.mean(jax.nn.relu(y - y.mean((0, 1, 2))) ** 2)

  f = jax.value_and_grad(loss)
  for a, b in zip(jax.tree.leaves(compiler.jit(f)(k, x)), jax.tree.leaves(jax.jit(f)(k, x))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_models_init_compiles_with_the_models_option_set(monkeypatch):
  asked = []
  real = compiler.compiler_options
  monkeypatch.setattr(compiler, 'compiler_options',
                      lambda **kwargs: asked.append(kwargs) or real(**kwargs))
  model = models.build('tiny', num_classes=5, performance=PerformanceOptions(xla_options='xla'))
  models.init(model, jax.random.key(0), (8, 8, 3))
  assert asked == [{'once': True, 'xla_options': 'xla'}]


def test_trainer_steps_compile_with_the_options(monkeypatch):
  # An option XLA rejects makes the first call fail, so the steps must carry the options.
  monkeypatch.setattr(compiler, 'compiler_options',
                      lambda backend=None, once=False, xla_options='jaxprune': {
                          'xla_cpu_no_such_option_jaxprune': 'true'})
  model = models.build('tiny', num_classes=3)
  images = jnp.zeros((4, 8, 8, 3))
  variables = model.init(jax.random.key(0), images[:1])
  trainer = train.Trainer(model, optax.sgd(0.1))
  state = trainer.init_state(variables, seed=0)
  batch = trainer.shard_batch({'image': images, 'label': jnp.zeros((4,), jnp.int32)})
  with pytest.raises(jax.errors.JaxRuntimeError, match='xla_cpu_no_such_option_jaxprune'):
    trainer.train_step(state, batch, None, np.float32(0.1))


@pytest.fixture
def restored_cache_config():
  names = ('jax_enable_compilation_cache', 'jax_compilation_cache_dir')
  before = {name: getattr(jax.config, name) for name in names}
  yield
  for name, value in before.items():
    jax.config.update(name, value)


def test_persistent_cache_directory_flag_then_environment_then_default(
    monkeypatch, tmp_path, restored_cache_config):
  monkeypatch.delenv(compiler.CACHE_ENV_VAR, raising=False)
  assert compiler.use_persistent_cache(None) == os.path.expanduser(compiler.DEFAULT_CACHE_DIR)
  monkeypatch.setenv(compiler.CACHE_ENV_VAR, str(tmp_path / 'env'))
  assert compiler.use_persistent_cache(None) == str(tmp_path / 'env')
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'env')
  assert compiler.use_persistent_cache(str(tmp_path / 'flag')) == str(tmp_path / 'flag')
  assert jax.config.jax_enable_compilation_cache
  assert compiler.use_persistent_cache('') == ''
  assert not jax.config.jax_enable_compilation_cache


def test_a_cache_directory_that_cannot_be_created_leaves_the_cache_off(
    tmp_path, restored_cache_config):
  (tmp_path / 'file').write_text('')
  assert compiler.use_persistent_cache(str(tmp_path / 'file' / 'cache')) == ''
  assert not jax.config.jax_enable_compilation_cache
  with pytest.raises(ConfigError, match=r"compilation_cache_dir '.*file' is a file"):
    compiler.use_persistent_cache(str(tmp_path / 'file'))
