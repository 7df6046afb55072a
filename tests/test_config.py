"""The single declaration of settings: every flag, check and stage identity comes from it."""

import dataclasses
import types

import pytest
from absl import flags

from jaxprune import data, errors, models, pipeline
from jaxprune.pipeline import config
from jaxprune.prune import criteria, select


def test_every_setting_has_a_stage_a_type_and_help():
  for setting in config.SETTINGS:
    assert setting.stage in config.STAGES, setting.name
    assert setting.type in (str, int, float, bool), setting.name
    assert setting.help.strip().endswith(('.', ')')), setting.name
    if setting.default is None:
      assert setting.optional, setting.name
    else:
      setting.check(setting.default)


def test_a_setting_without_a_stage_or_help_cannot_be_declared():
  with pytest.raises(ValueError, match='stage'):
    config.Setting('warmup_epochs', int, 0, 'Warm-up epochs.', 'warmup')
  with pytest.raises(ValueError, match='help'):
    config.Setting('warmup_epochs', int, 0, ' ', 'baseline')
  with pytest.raises(TypeError):
    config.Setting('warmup_epochs', int, 0, 'Warm-up epochs.')  # pylint: disable=no-value-for-parameter


def test_help_lists_the_allowed_values_from_the_registries():
  flag_values = flags.FlagValues()
  config.define_flags(flag_values)
  for name, registry in (('criterion', criteria.CRITERIA), ('model', models.MODELS),
                         ('dataset', data.DATASETS), ('selection', select.SELECTIONS),
                         ('preset', select.PRESETS)):
    for value in registry:
      assert value in flag_values[name].help, (name, value)
  assert set(flag_values) >= {s.name for s in config.SETTINGS}


def test_stage_identity_grows_along_the_pipeline():
  c = config.make()
  baseline = config.stage_settings(c, 'baseline')
  prune = config.stage_settings(c, 'prune')
  finetune = config.stage_settings(c, 'finetune')
  assert set(baseline) < set(prune) < set(finetune)
  assert 'lr' in baseline and 'criterion' not in baseline
  assert 'finetune_lr' in finetune and 'finetune_lr' not in config.stage_settings(c, 'scratch')
  for name in ('workdir', 'seeds', 'conv_impl', 'regime'):
    assert name not in finetune


def test_a_flagfile_from_a_stored_configuration_reproduces_it(tmp_path):
  original = config.make(workdir=str(tmp_path / 'w'), model='resnet20', criterion='fisher',
                         selection='macs', target_macs=0.4, lr=0.05, epochs=3, seeds=2,
                         scratch_b_cap=1.5, multihost=False, compilation_cache_dir='')
  stored = config.from_record(dataclasses.asdict(original))
  path = tmp_path / 'launch.flags'
  path.write_text(config.to_flagfile(stored))
  flag_values = flags.FlagValues()
  config.define_flags(flag_values)
  flag_values(['launch.py', f'--flagfile={path}'])
  assert config.from_flags(flag_values) == original


def test_ratio_policies_default_to_half_the_channels():
  assert config.make(selection='layer').prune_ratio == 0.5
  assert config.make(selection='macs', target_macs=0.5).prune_ratio is None


@pytest.mark.parametrize('settings, message', [
    ({'epochs': 0}, '--epochs must be at least 1, got 0.'),
    ({'lr': 0.0}, '--lr must be above 0, got 0.0.'),
    ({'target_macs': 1.5, 'selection': 'macs'}, '--target_macs must be at most 1, got 1.5.'),
    ({'selection': 'macs', 'target_macs': 0.5, 'prune_ratio': 0.3},
     '--selection=macs takes --target_macs, not --prune_ratio.'),
    ({'criterion': 'magic'}, "unknown --criterion 'magic'; choose one of: "),
    ({'epochs': 'ten'}, "--epochs must be a whole number, got 'ten'."),
    ({'lr': float('inf')}, '--lr must be a finite number, got inf.'),
])
def test_validation_names_the_setting_as_a_flag_on_the_command_line(settings, message):
  with pytest.raises(errors.ConfigError) as raised:
    config.validate(config.make(**settings))
  assert errors.as_flags(raised.value).startswith(message)
  assert '--' not in str(raised.value)


def test_named_flags_are_defined_as_launch_py_defines_them():
  everything, named = flags.FlagValues(), flags.FlagValues()
  config.define_flags(everything)
  config.define_flags(named, names=('epochs', 'model'))
  assert sorted(named) == ['epochs', 'model']
  for name in named:
    assert (named[name].help, named[name].default, type(named[name].parser)) == (
        everything[name].help, everything[name].default, type(everything[name].parser))
  named(['experiment', '--epochs=3'])
  assert (named.epochs, named.model) == (3, config.BY_NAME['model'].default)


def test_a_list_flag_is_read_as_values_of_its_setting():
  assert config.parse_list('l1, fisher', 'criteria', 'criterion') == ('l1', 'fisher')
  assert config.parse_list('0.5,0.25', 'budgets', 'target_macs') == (0.5, 0.25)
  with pytest.raises(errors.ConfigError) as raised:
    config.parse_list('l1,bogus', 'criteria', 'criterion')
  assert errors.as_flags(raised.value).startswith("--criteria value 'bogus': unknown criterion")


def test_width_multiplier_scales_every_default_width_and_identifies_the_baseline():
  from jaxprune import models
  from jaxprune.pipeline import stages
  full = models.widths_of(models.build('vgg11'))
  cifar = types.SimpleNamespace(num_classes=10, image_shape=(32, 32, 3))
  half = models.widths_of(stages.model_builder(config.make(model='vgg11', width_multiplier=0.5),
                                               cifar)(None))
  assert half == {g: w // 2 for g, w in full.items()}
  assert models.widths_of(models.build('tiny', width_multiplier=0.01)) == {
      g: 1 for g in models.widths_of(models.build('tiny'))}
  assert config.stage_settings(config.make(width_multiplier=0.5), 'baseline')[
      'width_multiplier'] == 0.5
  with pytest.raises(errors.ConfigError, match="width_multiplier must be above 0, got 0"):
    config.validate(config.make(width_multiplier=0.0))


def test_default_dirs_are_named_by_the_settings_that_differ_from_their_defaults():
  plain = config.make()
  assert config.make(weight_decay=1e-4, lr=0.1) == plain  # the defaults, given explicitly
  other = config.make(weight_decay=5e-4)
  assert other.workdir != plain.workdir and other.baseline_dir != plain.baseline_dir
  pruned_otherwise = config.make(prune_ratio=0.3)
  assert pruned_otherwise.workdir != plain.workdir
  assert pruned_otherwise.baseline_dir == plain.baseline_dir


def test_width_multiplier_thins_a_densenets_stream_so_every_channel_is_read():
  from jaxprune import models
  from jaxprune.prune import program
  half = models.build('densenet10', width_multiplier=0.5)
  full = models.build('densenet10')
  assert (half.growth, half.stem_channels()) == (full.growth // 2, full.stem_channels() // 2)
  # Every selection reads the whole (thinner) stream: its widths are its defaults.
  assert half.widths is None
  derived = program.derive(half, (8, 8, 3)).structure
  assert derived.widths['final'] == half.stem_channels() + 3 * 2 * half.growth
