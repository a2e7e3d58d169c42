"""The musclenode DICOM node: configuration, storage SCP, job queue, sending and web status."""
