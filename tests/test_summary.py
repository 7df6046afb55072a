"""The model summary tool: widths, MACs and params before and after pruning."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxprune import summary
from jaxprune.errors import ConfigError


def test_vgg16_convolutions_come_to_about_3_13e8_macs():
  result = summary.summarize('vgg16', dataset='cifar10')
  conv_macs = sum(c['macs'] for g, c in result['groups'].items() if g.startswith('conv'))
  head_macs = 512 * 10
  assert conv_macs - head_macs == pytest.approx(3.13e8, rel=2e-3)
  assert summary.human(result['macs']) == '313.2M'


def test_resnet56_totals_read_125_5m_macs_and_0_85m_params():
  text = summary.format_summary(summary.summarize('resnet56', dataset='cifar10'))
  assert 'resnet56 at 32x32x3 (cifar10), 10 classes' in text
  assert 'MACs 125.5M (125,485,696), params 0.85M (853,018)' in text


def test_a_width_multiplier_is_shown_and_counted():
  half = summary.summarize('vgg11', dataset='cifar10', width_multiplier=0.5)
  full = summary.summarize('vgg11', dataset='cifar10')
  assert half['width_multiplier'] == 0.5
  assert half['widths'] == {g: w // 2 for g, w in full['widths'].items()}
  assert 'vgg11 x0.5 widths at 32x32x3 (cifar10)' in summary.format_summary(half)


def test_digits_is_the_default_and_has_one_input_channel():
  result = summary.summarize('resnet20')
  assert (result['dataset'], result['image_shape'], result['num_classes']) == (
      'digits', [8, 8, 1], 10)
  # launch.py's resnet20 on digits: 2.52M; counted at 8x8x3 the stem would add
  # 3*3*2*16 MACs at each of the 8*8 positions (2.54M).
  assert summary.human(result['macs']) == '2.52M'


def test_cifar100_counts_a_100_class_head():
  result = summary.summarize('resnet20', dataset='cifar100')
  assert result['num_classes'] == 100 and result['image_shape'] == [32, 32, 3]


def test_an_npz_dataset_is_counted_at_its_image_shape(tmp_path):
  path = tmp_path / 'small.npz'
  images = np.zeros((4, 12, 12, 2), np.uint8)
  labels = np.array([0, 1, 2, 1])
  np.savez(path, train_images=images, train_labels=labels, test_images=images,
           test_labels=labels)
  result = summary.summarize('tiny', dataset='npz', data_path=str(path))
  assert (result['image_shape'], result['num_classes']) == ([12, 12, 2], 3)


@pytest.mark.parametrize('n,text', [(313201664, '313.2M'), (853018, '0.85M'), (1858, '1.86K'),
                                    (14724042, '14.72M'), (2.5e9, '2.50G'), (10, '10')])
def test_human_format(n, text):
  assert summary.human(n) == text


def test_group_rows_add_up_to_the_totals_before_and_after_pruning(tmp_path):
  path = tmp_path / 'record.json'
  path.write_text(json.dumps({'criterion': 'l1', 'widths': {'conv1': 3, 'fc': 5}}))
  result = summary.summarize('tiny', widths_file=str(path))
  for part in (result, result['pruned']):
    assert sum(c['macs'] for c in part['groups'].values()) == part['macs']
    assert sum(c['params'] for c in part['groups'].values()) == part['params']


def test_preset_summary_reports_the_reductions():
  result = summary.summarize('resnet56', dataset='cifar10', preset='resnet56_b')
  assert result['pruned']['widths']['stage1_block1'] == 6
  assert result['reduction_percent']['macs'] == pytest.approx(
      100 * (1 - result['pruned']['macs'] / result['macs']))
  text = summary.format_summary(result)
  assert '-27.6%' in text and 'pruned by preset resnet56_b' in text


def test_masks_file_gives_the_widths_it_keeps(tmp_path):
  path = tmp_path / 'masks.json'
  path.write_text(json.dumps({'masks': {'conv2': [1, 0] * 8}}))
  widths = summary.summarize('tiny', widths_file=str(path))['pruned']['widths']
  assert widths == {'conv1': 8, 'conv2': 8, 'fc': 16}


@pytest.mark.parametrize('content,message', [
    ({'widths': {'conv9': 3}}, 'unknown groups'),
    ({'widths': {'conv1': 0}}, 'positive integers'),
    ({'masks': {'conv1': [0] * 8}}, 'removes all 8 channels'),
    ({'masks': {'conv1': [1] * 7}}, 'shape'),
    ({'scores': {}}, "'widths' or a 'masks' key"),
])
def test_wrong_widths_files_are_config_errors(tmp_path, content, message):
  path = tmp_path / 'w.json'
  path.write_text(json.dumps(content))
  with pytest.raises(ConfigError, match=message) as info:
    summary.summarize('tiny', widths_file=str(path))
  assert info.value.settings == ('widths_file',)


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'jaxprune.summary', *args], capture_output=True,
                        text=True, env=env, timeout=120)


def test_cli_json_prints_one_object_with_macs_params_widths_and_reductions():
  done = run_cli('--model=vgg16_mlp', '--dataset=cifar10', '--json', '--preset=vgg16_a')
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout)
  assert {'macs', 'params', 'widths', 'pruned', 'reduction_percent'} <= set(result)
  assert result['widths']['conv1_1'] == 64 and result['pruned']['widths']['conv1_1'] == 32
  assert result['reduction_percent']['macs'] == pytest.approx(34.2, abs=0.05)


@pytest.mark.parametrize('args,message', [
    (('--model=resnet56', '--preset=resnet56_c'), "unknown --preset 'resnet56_c'; choose one of:"),
    (('--model=tiny', '--preset=vgg16_a'), '--preset=vgg16_a is for vgg16 or vgg16_mlp, not for '
     'tiny.'),
    (('--model=vgg16',), '--model=vgg16 cannot take the 8x8x1 images of --dataset=digits: this '
     'VGG needs images of at least'),
    (('--model=tiny', '--dataset=mnist'), "unknown --dataset 'mnist'; choose one of: cifar10,"),
    (('--model=tiny', '--preset=vgg16_a', '--widths_file=w.json'),
     'give either --preset or --widths_file, not both.'),
    ((), '--model is required; choose one of: tiny,'),
])
def test_cli_errors_exit_1_with_one_sentence_and_no_traceback(args, message):
  done = run_cli(*args)
  assert done.returncode == 1
  assert done.stdout == ''
  assert done.stderr.strip().startswith(f'error: {message}')
  assert len(done.stderr.strip().splitlines()) == 1


def test_cli_help_names_the_prune_record_where_runs_write_it():
  done = run_cli('--help')
  assert done.returncode == 0
  assert 'runs/x/prune/record.json' in done.stdout and 'prune.json' not in done.stdout
