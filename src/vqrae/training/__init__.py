"""Training, evaluation and publishing of VQRAE tokenizers (needs the `train` extra: `pip install -e ".[train]"`).

Sub-modules are imported explicitly (e.g. `from vqrae.training.hub import push_to_hub`), so importing `vqrae`
never pulls in the training dependencies.
"""
