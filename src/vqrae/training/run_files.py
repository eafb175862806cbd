"""The names of the files a training run (and `vqrae-evaluate`) writes into its output folder, and the fields of its
`eval_results.json`, said once."""

__all__ = [
    "CHECKPOINTS_DIR",
    "EVAL_RESULT_FIELDS",
    "RUN_OUTPUTS",
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
CHECKPOINTS_DIR = "checkpoints"  # checkpoint-{step} folders
TRACKER_DIR = "runs"  # what --report_to trackers log
MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")  # the trained model
MODEL_CARD_FILE = "README.md"
# Everything a run writes into output_dir (removed by --overwrite_output_dir).
RUN_OUTPUTS = (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    TRACKER_DIR,
    EVAL_RESULTS_FILE,
    HELD_OUT_FILE,
    TRAINING_CONFIG_FILE,
    *PICTURES,
    *MODEL_FILES,
    MODEL_CARD_FILE,
)

_NUMBER = (int, float)
# The fields of eval_results.json in the order it holds them: field -> the types its value has, or None for a field
# that may be null (not measured in this run).
EVAL_RESULT_FIELDS = {
    "dataset_name": (str,),
    "dataset_split": (str,),
    "held_out": None,
    "num_images": (int,),
    "image_size": (int,),
    "step": (int,),
    "psnr": _NUMBER,
    "psnr_interval": None,
    "ssim": _NUMBER,
    "ssim_interval": None,
    "color_error": None,
    "color_error_interval": None,
    "seam_score": None,
    "codebook_utilization": _NUMBER,
    "used_codes": (int,),
    "codebook_tokens": None,
    "perplexity": _NUMBER,
    "crop_codebook_use": None,
    "bits_per_image": _NUMBER,
    "bicubic_psnr": _NUMBER,
    "bicubic_psnr_interval": None,
    "bicubic_ssim": _NUMBER,
    "bicubic_ssim_interval": None,
    "bicubic_color_error": None,
    "bicubic_color_error_interval": None,
    "bicubic_seam_score": None,
    "bicubic_bits_per_image": _NUMBER,
    "rfid": None,
}
