"""Files in and out: safe model loading, input files, and result files written atomically.

The command line is built from these functions, and so can other commands and scripts:

    >>> from jacket import io
    >>> model = io.load_model("model.keras")                 # Keras safe_mode on
    >>> x = io.read_inputs("inputs.npz", model)               # what `jacket.jacobian` accepts
    >>> blocks = io.stream_jacobian(model, x, "J.zarr", batch_size=64)

- Models (`jacket.io.models`): `.keras` (Keras 3), `.h5`/`.hdf5` (legacy), or `module:function` /
  `file.py:function` naming a function that returns a model, loaded with Keras's `safe_mode`; files
  from anyone are checked first (NOTE: [Untrusted files] there).
- Inputs (`jacket.io.inputs`, `jacket.io.images`): `.npy` (memory-mapped), `.npz` or a zarr group
  (named arrays, matched to the model's input names), a `.zarr` array, a CSV table (one sample per
  row), or a folder or glob of images.
- Results (`jacket.io.results`, `jacket.io.streams`, `jacket.io.sparse_files`): `.npy` (one
  array), `.npz` or `.zarr` (one array per output x input block, keys `"J"` for a single block,
  `"<output>/<input>"` otherwise), and sparse Jacobians and patterns, written under a temporary name
  in the same folder and renamed when complete (`jacket.io.files`), so a killed run never leaves a
  partial file under the final name.

Nothing here imports Keras at module level (the command line chooses the backend first).
"""

from __future__ import annotations

from .files import atomic_output as atomic_output
from .files import check_output as check_output
from .files import save_array as save_array
from .files import save_arrays as save_arrays
from .files import save_figure as save_figure
from .files import save_json as save_json
from .images import ImageStack as ImageStack
from .inputs import check_inputs_source as check_inputs_source
from .inputs import iter_batches as iter_batches
from .inputs import num_samples as num_samples
from .inputs import padded_batches as padded_batches
from .inputs import read_inputs as read_inputs
from .inputs import read_labels as read_labels
from .loading import Loaded as Loaded
from .loading import check_sources as check_sources
from .loading import describe_inputs as describe_inputs
from .loading import load as load
from .models import check_archive as check_archive
from .models import check_model_source as check_model_source
from .models import is_model_function as is_model_function
from .models import load_model as load_model
from .results import ResultWriter as ResultWriter
from .results import assemble_flat as assemble_flat
from .results import jacobian_blocks as jacobian_blocks
from .results import read_result as read_result
from .results import write_result as write_result
from .sparse_files import load_sparse_jacobian as load_sparse_jacobian
from .sparse_files import load_sparsity as load_sparsity
from .sparse_files import read_pattern as read_pattern
from .sparse_files import save_sparse_jacobian as save_sparse_jacobian
from .sparse_files import save_sparsity as save_sparsity
from .streams import stream_jacobian as stream_jacobian
from .streams import stream_sparse_jacobian as stream_sparse_jacobian

__all__ = [
    "ImageStack",
    "Loaded",
    "ResultWriter",
    "assemble_flat",
    "atomic_output",
    "check_archive",
    "check_inputs_source",
    "check_model_source",
    "check_output",
    "check_sources",
    "describe_inputs",
    "is_model_function",
    "iter_batches",
    "jacobian_blocks",
    "load",
    "load_model",
    "load_sparse_jacobian",
    "load_sparsity",
    "num_samples",
    "padded_batches",
    "read_inputs",
    "read_labels",
    "read_pattern",
    "read_result",
    "save_array",
    "save_arrays",
    "save_figure",
    "save_json",
    "save_sparse_jacobian",
    "save_sparsity",
    "stream_jacobian",
    "stream_sparse_jacobian",
    "write_result",
]
