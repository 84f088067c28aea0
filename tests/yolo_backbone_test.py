"""The YOLOv3 head documented in docs/reuse.md fits the backbone's features.

The head's code is taken from the documentation itself, so the example
cannot drift from what is tested.
"""

import os
import re

import jax
import jax.numpy as jnp
import pytest

from darknet53_jax import model as model_lib

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   'docs', 'reuse.md')
SIZE = 416
CLASSES = 80


@pytest.fixture(scope='module')
def yolo_head_class():
  """``YoloV3Head`` as defined by the documented example."""
  with open(DOC, encoding='utf-8') as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.DOTALL)
  (source,) = [b for b in blocks if 'class YoloV3Head' in b]
  namespace = {}
  exec(compile(source, DOC, 'exec'), namespace)  # pylint: disable=exec-used
  return namespace['YoloV3Head']


def test_head_outputs_at_416(yolo_head_class):
  backbone = model_lib.Darknet53(negative_slope=0.01)
  head = yolo_head_class(num_classes=CLASSES)

  def detect(images):
    key = jax.random.key(0)
    features = backbone.apply(backbone.init(key, images), images,
                              features_only=True)
    return features, head.apply(head.init(key, features), features)

  features, outputs = jax.eval_shape(
      detect, jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32))
  assert [f.shape for f in features] == [
      (2, 52, 52, 256), (2, 26, 26, 512), (2, 13, 13, 1024)]
  assert [o.shape for o in outputs] == [
      (2, 13, 13, 3, 5 + CLASSES), (2, 26, 26, 3, 5 + CLASSES),
      (2, 52, 52, 3, 5 + CLASSES)]
  assert all(o.dtype == jnp.float32 for o in outputs)


def test_head_trains_with_batch_statistics(yolo_head_class):
  head = yolo_head_class(num_classes=CLASSES)
  features = tuple(jax.ShapeDtypeStruct((1, SIZE // s, SIZE // s, c),
                                        jnp.float32)
                   for s, c in ((8, 256), (16, 512), (32, 1024)))
  variables = jax.eval_shape(head.init, jax.random.key(0), features)
  _, updates = jax.eval_shape(
      lambda v, f: head.apply(v, f, train=True, mutable=['batch_stats']),
      variables, features)
  assert (jax.tree.structure(updates['batch_stats'])
          == jax.tree.structure(variables['batch_stats']))
