"""The musclenode DICOM node: configuration, storage SCP, study completion, job queue and workers, sending, CLI."""

import quant  # noqa: F401  (first: it sets the numeric libraries' thread settings before numpy loads)

#: Libraries whose INFO is per-association / per-module chatter: WARNING and up only,
#: in the CLI unless verbose, in the worker processes always.
CHATTY_LOGGERS = ("pynetdicom", "highdicom", "alembic")   # alembic: "Context impl ..." on every start
