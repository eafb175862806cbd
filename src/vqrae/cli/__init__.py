"""The command-line tools, on top of the library (`vqrae`) and the training package (`vqrae.training`):
`vqrae-train` (`train`), `vqrae-evaluate` (`evaluate`), `vqrae-tokenize` (`tokenize`) and `vqrae-push` (`push`),
and what they share (`common`). They parse arguments and turn the `vqrae.errors.UsageError` the layers below raise
into one line, `PROG: error: ...`, and exit status 2; nothing below imports this package.
"""
