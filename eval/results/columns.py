"""The columns of the run outputs: one place for the writer (`eval.run`) and the readers
(`eval.report.tables`, `eval.results.ledger`), kept free of torch so that the tables load fast."""

from __future__ import annotations

# The scores of a row and their short names in tables and plots.
METRICS = {"pixel_accuracy": "Acc", "miou": "mIoU"}

# How a run was made, besides its dataset: what tells sweep points apart. The full record of each
# group's parameters is in the *_settings columns (JSON).
SETTING_COLUMNS = (
    "protocol",
    "model",
    "dtype",
    "segmenter",
    "timestep",
    "kl_threshold",
    "num_points",
    "refine",
    "weights",
    "resolution",
)
# results.csv and the ledger (ledger_version 2); the order is the ledger's header.
RESULT_COLUMNS = (
    "ledger_version",
    "run_id",
    "timestamp",
    "experiment",
    "dataset",
    "split",
    *SETTING_COLUMNS,
    "n_images",
    "pixel_accuracy",
    "miou",
    "deviations",
    "split_size",
    "n_skipped",
    "skipped_ids",
    "limit",
    "model_id",
    "model_revision",
    "model_hash",
    "attention_cache",
    "protocol_settings",
    "dataset_settings",
    "segmenter_settings",
    "seed",
    "batch_size",
    "mean_segments",
    "seconds",
    "images_per_s",
    "device",
    "versions",
    "git_commit",
    "run_dir",
    # The scoring rule (eval.analysis.rescore) and, for a rescoring's row, the run it rescored.
    "scoring",
    "rescored_from",
    # Granularity (eval.scoring.granularity) and the thing/stuff split of the mIoU.
    "pixel_accuracy_many_to_one",
    "miou_many_to_one",
    "oversegmented",
    "undersegmented",
    "boundary_iou",
    "miou_things",
    "miou_stuff",
)
PER_CLASS_COLUMNS = ("class", "iou", "tp", "fp", "fn")
PER_IMAGE_COLUMNS = ("id", "segments", "accuracy", "miou")
