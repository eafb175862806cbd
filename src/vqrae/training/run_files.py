"""The names of the files a training run (and `vqrae-evaluate`) writes into its output folder, said once."""

__all__ = [
    "CODEBOOK_USAGE_FILE",
    "EVAL_RESULTS_FILE",
    "HELD_OUT_FILE",
    "METRICS_FILE",
    "PICTURES",
    "RECONSTRUCTIONS_FILE",
    "TRAINING_CONFIG_FILE",
    "TRAINING_CURVES_FILE",
]

EVAL_RESULTS_FILE = "eval_results.json"  # the flat results object the model card reads
HELD_OUT_FILE = "held_out_ids.txt"  # the names of the training examples held out for validation, one a line
TRAINING_CONFIG_FILE = "training_config.yaml"  # every option of the run (`vqrae-train --config` reproduces it)
METRICS_FILE = "metrics.jsonl"  # one JSON record per logging window, evaluation and data summary
RECONSTRUCTIONS_FILE = "reconstructions.png"
TRAINING_CURVES_FILE = "training_curves.png"
CODEBOOK_USAGE_FILE = "codebook_usage.png"
PICTURES = (RECONSTRUCTIONS_FILE, TRAINING_CURVES_FILE, CODEBOOK_USAGE_FILE)  # in the order the model card shows
