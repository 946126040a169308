"""The columns of the run outputs: one place for the writer (`eval.run`) and the reader
(`eval.tables`), kept free of torch so that the tables load fast."""

from __future__ import annotations

# How a run was made, besides its dataset: what tells sweep points and table rows apart.
SETTING_COLUMNS = (
    "protocol",
    "model",
    "segmenter",
    "timestep",
    "kl_threshold",
    "num_points",
    "refine",
    "weights",
    "resolution",
)
# results.csv and the ledger; the order is the ledger's header, so new columns go at the end.
RESULT_COLUMNS = (
    "run_id",
    "timestamp",
    "experiment",
    SETTING_COLUMNS[0],
    "dataset",
    "split",
    *SETTING_COLUMNS[1:],
    "n_images",
    "pixel_accuracy",
    "miou",
    "mean_segments",
    "seconds",
    "images_per_s",
    "device",
    "seed",
    "versions",
    "git_commit",
    "run_dir",
)
PER_CLASS_COLUMNS = ("class", "iou", "tp", "fp", "fn")
PER_IMAGE_COLUMNS = ("id", "segments", "accuracy", "miou")
