"""A ``dask worker --preload`` for tests: this worker's stagepool claims the version in
``STAGEPOOL_TEST_VERSION``, as a worker of another release would (without installing one)."""

import os

import stagepool

stagepool.__version__ = os.environ["STAGEPOOL_TEST_VERSION"]
