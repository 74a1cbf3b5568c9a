"""The detector workflow on top of merging: checkpoint layouts, evaluation (`r2m eval`), and the
built-in synthetic deepfake benchmark that `make demo` runs."""
