"""Commands and helpers that glue the stages together: CLI conventions, atomic file output,
the built-in corpus, data preparation, weight conversion and checkpoint inspection.

Importing `tools` (or `tools.cli`, `tools.fileio`, `tools.corpus`) never imports torch, so the
tokenizer commands stay light."""
