"""Training VQRAE tokenizers with accelerate on `datasets` images: data, losses, metrics, the loop and the CLI.

The submodules are imported on use (`from vqrae.training.metrics import evaluate_model`), so importing the model
never pulls in the training dependencies.
"""
