"""Our train step against PyTorch's, on timm's darknet53.

timm's darknet53 (narrow, random weights, random non-zero BatchNorm scales:
timm zero-initialises some, and at exactly 0 the frameworks' leaky ReLU
derivatives differ) is converted with ``convert_timm`` and trained by both
frameworks for STEPS steps on the same uint8 batches, normalised alike, with
one recipe: SGD with momentum, weight decay on kernels only, label smoothing
e / (K - 1), warm-up then cosine, BatchNorm momentum in each framework's
convention and the unbiased running variance (PyTorch's; ours is an
option). Both of our recipes' update rules are checked: ours (leaky ReLU,
0.9 of the old statistic, per-step cosine) on one device, and the
reference's (ReLU, 0.1, per-epoch cosine from epoch 0) on DEVICES devices,
with synchronised BatchNorm so that they compute what PyTorch's one batch
does. That multi-device run is this file as a module in a subprocess with
forced CPU devices, started first so that it compiles beside the others.

Semantics are compared in float64: the network amplifies rounding from step
to step, so float32 is compared over one step only. float64 is not a
training dtype: the tests add it to ``precision.DTYPES`` to run our own
steps in it. The README lists the measured differences.
"""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from darknet53_jax import build
from darknet53_jax import convert_timm
from darknet53_jax import image_ops
from darknet53_jax import precision
from darknet53_jax import sharding
from tests import conftest

torch = pytest.importorskip('torch')

STEPS = 4
STEPS_PER_EPOCH = 2  # One warm-up epoch, then two epochs of cosine of three.
BATCH = 8
SIZE = 64  # 2x2 maps at the last stage, as the reference's 256 px has 8x8.
CLASSES = 10
# One residual block, at the last stage (3x3 64 -> 128: the CPU Winograd path
# in float32): more would compute the same kind of thing, at compile time.
DEPTHS = (0, 0, 0, 0, 1)
WIDTHS = (4, 8, 16, 32, 64, 128)  # Stem, then stages: 1/8 of darknet53's.
LEARNING_RATE = 0.02
WEIGHT_DECAY = 5e-4
LABEL_SMOOTHING = 0.1
DEVICES = 4
RECIPES = {
    'ours': {'activation': 'leaky_relu', 'bn_momentum': 0.9,
             'cosine_schedule': 'per_step_after_warmup'},
    'reference': {'activation': 'relu', 'bn_momentum': 0.1,
                  'cosine_schedule': 'per_epoch_from_epoch0'},
}
TORCH_DTYPES = {'float32': torch.float32, 'float64': torch.float64}


def _config(recipe: str, dtype: str):
  config = conftest.tiny_config()
  config.update(
      dtype=dtype, num_classes=CLASSES, batch_size=BATCH, train_size=SIZE,
      learning_rate=LEARNING_RATE, lr_scaling='none', warmup_epochs=1,
      num_epochs=3, eta_min=0.0, momentum=0.9, weight_decay=WEIGHT_DECAY,
      label_smoothing=LABEL_SMOOTHING, sync_batch_norm=True,
      cosine_schedule=RECIPES[recipe]['cosine_schedule'])
  config.model.update(
      width_multiplier=WIDTHS[-1] / 1024, stage_depths=DEPTHS,
      activation=RECIPES[recipe]['activation'],
      negative_slope=convert_timm.TIMM_NEGATIVE_SLOPE,
      bn_momentum=RECIPES[recipe]['bn_momentum'], bn_unbiased_variance=True)
  return config


def _learning_rate(recipe: str, step: int) -> float:
  """The schedule, written out: warm-up, then the recipe's cosine."""
  warmup = STEPS_PER_EPOCH
  if step < warmup:
    return LEARNING_RATE * (step + 1) / warmup
  if RECIPES[recipe]['cosine_schedule'] == 'per_epoch_from_epoch0':
    progress = (step // STEPS_PER_EPOCH) / 3
  else:
    progress = (step - warmup) / (3 * STEPS_PER_EPOCH - warmup)
  return LEARNING_RATE * (1 + math.cos(math.pi * progress)) / 2


def _normalized(images, config) -> np.ndarray:
  """NCHW images as our steps normalise them, for PyTorch: in float32 with
  XLA's rounding (its division is not always NumPy's)."""
  return np.array(image_ops.normalize(
      images, config.mean_rgb, config.std_rgb, jnp.float32)).transpose(
          0, 3, 1, 2)


def _torch_train(model, config, recipe, batches):
  """(losses, variables after each step) of PyTorch's SGD on ``model``."""
  dtype = TORCH_DTYPES[config.dtype]
  model.to(dtype).train()
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.momentum = 1 - config.model.bn_momentum  # Weight of the batch.
  kernels = [p for name, p in model.named_parameters()
             if name.endswith(('conv.weight', 'fc.weight'))]
  others = [p for name, p in model.named_parameters()
            if not name.endswith(('conv.weight', 'fc.weight'))]
  optimizer = torch.optim.SGD(
      [{'params': kernels, 'weight_decay': WEIGHT_DECAY},
       {'params': others, 'weight_decay': 0.0}], lr=0.0, momentum=0.9)
  losses, variables = [], []
  for step, batch in enumerate(batches):
    for group in optimizer.param_groups:
      group['lr'] = _learning_rate(recipe, step)
    images = torch.from_numpy(_normalized(batch['image'], config)).to(dtype)
    one_hot = np.eye(CLASSES)[batch['label']]
    targets = torch.from_numpy(
        one_hot * (1 - LABEL_SMOOTHING) +
        (1 - one_hot) * LABEL_SMOOTHING / (CLASSES - 1)).to(dtype)
    log_probs = torch.log_softmax(model(images), dim=-1)
    loss = -(targets * log_probs).sum(-1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    variables.append(convert_timm.load_timm_state_dict(
        model.state_dict(), np.dtype(config.dtype))[1])
  return losses, variables


def _jax_train(config, variables, batches, devices):
  """(losses, learning rates, variables after each step) of our steps."""
  mesh = sharding.create_mesh(devices)
  # The abstract state: ours replaces every leaf, so nothing initialises.
  run = build.training(config, mesh, STEPS_PER_EPOCH, abstract=True)
  dtype = np.dtype(config.dtype)
  params, stats = (jax.tree.map(lambda x: np.asarray(x, dtype), variables[k])
                   for k in ('params', 'batch_stats'))
  state = jax.device_put(
      run.state.replace(step=np.zeros((), run.state.step.dtype),
                        params=params, batch_stats=stats,
                        opt_state=jax.jit(run.state.tx.init)(params)),
      sharding.replicated(mesh))
  losses, rates, after = [], [], []
  for batch in batches:
    state, metrics = run.train_step(state, sharding.global_batch(mesh, batch))
    losses.append(float(metrics['loss']))
    rates.append(float(metrics['learning_rate']))
    after.append(jax.device_get({'params': state.params,
                                 'batch_stats': state.batch_stats}))
  return losses, rates, after


def parity(timm, recipe: str, dtype: str, steps: int, devices) -> dict:
  """Both frameworks' training from the same start: the relative
  differences of the loss, learning rate, parameters and BatchNorm
  statistics at each step (the largest over the leaves)."""
  config = _config(recipe, dtype)
  torch.manual_seed(0)
  model = conftest.randomise_batch_norm(conftest.timm_darknet53(
      timm, DEPTHS, WIDTHS, CLASSES, RECIPES[recipe]['activation']), seed=1)
  _, variables = convert_timm.load_timm_state_dict(model.state_dict())
  batches = conftest.random_batches(config, steps, num_classes=CLASSES)
  want_losses, want = _torch_train(model, config, recipe, batches)
  with jax.enable_x64(dtype == 'float64'):
    losses, rates, got = _jax_train(config, variables, batches, devices)
  return {
      'loss': [abs(a - b) / abs(b) for a, b in zip(losses, want_losses)],
      'params': [conftest.max_relative_difference(a['params'], b['params'])
                 for a, b in zip(got, want)],
      'batch_stats': [conftest.max_relative_difference(a['batch_stats'],
                                                       b['batch_stats'])
                      for a, b in zip(got, want)],
      'learning_rate': [abs(r - _learning_rate(recipe, i)) /
                        _learning_rate(recipe, i)
                        for i, r in enumerate(rates)],
  }


@pytest.fixture(scope='module')
def timm():
  return conftest.import_timm()


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread(timm):
  """PyTorch's CPU threads spin against XLA's on a small machine: one
  thread runs these tiny steps tens of times faster."""
  del timm  # Skips first where it cannot be imported.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope='module', autouse=True)
def several_devices(one_torch_thread, tmp_path_factory):
  """The multi-device run, started first: it compiles on another core while
  this process runs the other tests."""
  del one_torch_thread
  directory = tmp_path_factory.mktemp('several_devices')
  with open(directory / 'stdout', 'w') as out, open(directory / 'stderr',
                                                      'w') as err:
    process = subprocess.Popen(
        [sys.executable, '-m', 'tests.torch_parity_test'],
        env=conftest.subprocess_env(devices=DEVICES), cwd=conftest.REPO,
        stdout=out, stderr=err, text=True)
  yield process, directory
  if process.poll() is None:
    process.kill()
    process.wait()


@pytest.fixture
def float64(monkeypatch):
  monkeypatch.setitem(precision.DTYPES, 'float64', jnp.float64)


def _assert_within(differences: dict, tolerance: float):
  for name, values in differences.items():
    assert max(values) < tolerance, (name, values)


def test_float64_steps_match_pytorch(timm, float64):
  del float64
  differences = parity(timm, 'ours', 'float64', STEPS, jax.devices()[:1])
  # Measured at most 3.1e-15 here, 1.5e-14 with the reference's recipe
  # (AMD EPYC): float64 rounding, nothing else.
  _assert_within(differences, 1e-12)


def test_float32_step_matches_pytorch(timm):
  differences = parity(timm, 'ours', 'float32', 1, jax.devices()[:1])
  # One step: the BatchNorm statistics differ most, by 5.9e-7 here and
  # 4.0e-6 with the reference's recipe (AMD EPYC): 32 values per channel at
  # the 2x2 maps, and XLA's and oneDNN's float32 kernels, which round
  # differently, and differently by CPU family.
  _assert_within(differences, 2e-5)


def test_reference_float64_steps_on_several_devices_match_pytorch(
    several_devices):
  process, directory = several_devices
  assert process.wait(timeout=600) == 0, (
      directory / 'stderr').read_text()[-3000:]
  results = json.loads(
      (directory / 'stdout').read_text().strip().splitlines()[-1])
  assert results.pop('devices') == DEVICES
  assert set(results) == {'reference'}
  _assert_within(results['reference'], 1e-12)


if __name__ == '__main__':
  precision.DTYPES['float64'] = jnp.float64
  torch.set_num_threads(1)
  print(json.dumps(
      {'devices': jax.device_count(),
       'reference': parity(conftest.import_timm(), 'reference', 'float64',
                           STEPS, jax.devices())}))
