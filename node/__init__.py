"""The musclenode DICOM node: configuration, storage SCP, study completion, job queue and workers, sending, CLI."""

#: Libraries whose INFO is per-association / per-module chatter: WARNING and up only,
#: in the CLI unless verbose, in the worker processes always.
CHATTY_LOGGERS = ("pynetdicom", "highdicom", "alembic")   # alembic: "Context impl ..." on every start
