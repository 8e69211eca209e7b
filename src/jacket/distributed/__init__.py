"""Jacobians of whole datasets, beyond memory and beyond one machine: Dask computes, zarr stores.

    >>> from jacket.distributed import jacobian_dataset, sensitivity_dataset
    >>> J = jacobian_dataset("model.keras", "inputs.zarr", "jacobians.zarr", batch_size=256)
    >>> J.shape                                   # a zarr array on disk: (n, *out_shape, *in_shape)
    >>> s = sensitivity_dataset("model.keras", "inputs.zarr", reduce="rms")   # nothing stored

The inputs are cut into chunks of `batch_size` samples. Each chunk is one task: a Dask worker loads
the model from its path (with Keras's `safe_mode`, once per worker process), reads its samples,
computes their Jacobians with `jacket.jacobian_fn` and writes them into the zarr store as one zarr
chunk. Nothing is pickled but paths, options and (for NumPy inputs) the chunk's samples; the driver
never holds more than one chunk of the result.

- `runners`: the public functions below; `job`: a run's `Job`, cut into chunks.
- `cluster`: where the chunks run (NOTE: [Where the chunks run]), `Cluster`.
- `store`: the zarr store and its manifest (NOTE: [Resuming a dataset run]).
- `source`, `skeletons`: the inputs and their structure; `worker`: what runs on the workers.

Importing this package imports neither Keras nor Dask: the driver of a run on a cluster never
imports Keras (its workers load the model).
"""

from __future__ import annotations

from .cluster import IN_PROCESS_MAX_BYTES as IN_PROCESS_MAX_BYTES
from .cluster import Cluster as Cluster
from .job import OPTION_DEFAULTS as OPTION_DEFAULTS
from .runners import DEFAULT_BATCH_SIZE as DEFAULT_BATCH_SIZE
from .runners import jacobian_dataset as jacobian_dataset
from .runners import jacobian_norms_dataset as jacobian_norms_dataset
from .runners import sensitivity_dataset as sensitivity_dataset

__all__ = [
    "jacobian_dataset",
    "sensitivity_dataset",
    "jacobian_norms_dataset",
    "Cluster",
    "DEFAULT_BATCH_SIZE",
    "IN_PROCESS_MAX_BYTES",
]
