"""Runs the Colab notebook headlessly (nbclient) with its CI parameters.

The notebook reads DARKNET53_NOTEBOOK_CI=1 in its parameters cell: a tiny
model for one epoch, no install, no network and no TensorBoard server.
"""

import json
import os
import sys
import time

import pytest

from tests import conftest

REPO = conftest.REPO
NOTEBOOK = os.path.join(REPO, 'notebooks', 'darknet53_jax_colab.ipynb')
CELL_TIMEOUT_S = 600


def _load_json():
  with open(NOTEBOOK, encoding='utf-8') as f:
    return json.load(f)


def test_checked_in_notebook_has_no_outputs():
  notebook = _load_json()
  code_cells = [c for c in notebook['cells'] if c['cell_type'] == 'code']
  assert code_cells
  for cell in code_cells:
    source = ''.join(cell['source'])
    assert cell.get('outputs') == [], f'clear the outputs of: {source[:80]}'
    assert cell.get('execution_count') is None, (
        f'clear the execution count of: {source[:80]}')
  parameters = [c for c in code_cells
                if 'parameters' in c.get('metadata', {}).get('tags', [])]
  assert len(parameters) == 1, 'one code cell must be tagged "parameters"'
  assert 'DARKNET53_NOTEBOOK_CI' in ''.join(parameters[0]['source'])
  assert notebook['metadata']['kernelspec']['name'] == 'python3'


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch):
  """A 'python3' kernel spec that runs this very interpreter.

  JUPYTER_PATH comes first in Jupyter's search path, so a python3 spec in a
  user or system folder cannot send the notebook to another Python.
  """
  for module in ('nbclient', 'nbformat', 'ipykernel', 'matplotlib'):
    pytest.importorskip(module)  # Before the data fixture does any work.
  from ipykernel import kernelspec  # pylint: disable=g-import-not-at-top
  from jupyter_client import kernelspec as client_kernelspec  # pylint: disable=g-import-not-at-top
  kernels = tmp_path / 'jupyter'
  kernelspec.write_kernel_spec(str(kernels / 'kernels' / 'python3'))
  monkeypatch.setenv('JUPYTER_PATH', str(kernels))
  spec = client_kernelspec.KernelSpecManager().get_kernel_spec('python3')
  assert spec.argv[0] == sys.executable, spec.argv
  return 'python3'


def test_notebook_runs_top_to_bottom(python3_kernel, digits_data_dir, tmp_path,
                                     monkeypatch):
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / 'workdir'
  # The kernel, and the commands it starts, inherit this environment
  # (conftest's shared JAX compilation cache included).
  monkeypatch.setenv('DARKNET53_NOTEBOOK_CI', '1')
  monkeypatch.setenv('DARKNET53_NOTEBOOK_WORKDIR', str(workdir))
  monkeypatch.setenv('DARKNET53_NOTEBOOK_DATA_DIR', digits_data_dir)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
  client = nbclient.NotebookClient(
      notebook, kernel_name=python3_kernel, timeout=CELL_TIMEOUT_S,
      startup_timeout=180, resources={'metadata': {'path': REPO}})
  start = time.monotonic()
  try:
    client.execute()  # Raises CellExecutionError on the first failing cell.
  finally:
    # Kept for debugging: pytest's tmp_path of this test.
    nbformat.write(notebook, str(tmp_path / 'executed.ipynb'))
  print(f'notebook ran in {time.monotonic() - start:.0f} s')
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      errors = [o for o in cell.outputs if o.output_type == 'error']
      assert not errors, errors
  # What each step leaves behind.
  assert (workdir / 'learning_curves.png').is_file()
  assert (workdir / 'export' / 'stablehlo' / 'model.jax_exported').is_file()
  assert len(os.listdir(workdir / 'images')) == 6
