"""`uhrbat batch`: questions over image archives, in-process or on a Ray cluster.

* `inputs` — JSONL/CSV/Parquet lists or `--images DIR_OR_GLOB` -> validated `BatchRow`s (stable ids,
  duplicate ids refused, relative paths, trust level).
* `engines` — `answer_rows` (batch rows through the one row runner, `uhrbat.rowrunner`),
  `run_local`, `run_ray`.
* `output` — the resumable run directory (`predictions.jsonl`, GeoJSON, Parquet, summary).
* `runner` — `run_batch(rows, BatchConfig)` ties them together.
"""

from uhrbat.batch.engines import answer_rows, run_local, run_ray
from uhrbat.batch.inputs import BatchRow, images_rows, read_input, row_id
from uhrbat.batch.output import Answered, PredictionStore, Summary
from uhrbat.batch.runner import BatchConfig, run_batch

__all__ = [
    "Answered",
    "BatchConfig",
    "BatchRow",
    "PredictionStore",
    "Summary",
    "answer_rows",
    "images_rows",
    "read_input",
    "row_id",
    "run_batch",
    "run_local",
    "run_ray",
]
