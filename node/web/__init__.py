"""The node's web service for trial coordinators: a FastAPI application (:mod:`.app`) over
the node's database, with bearer tokens and roles (:mod:`.tokens`), pseudonymised subjects
(:mod:`.pseudonym`) and the long-format views of the measurements (:mod:`.queries`).
"""
