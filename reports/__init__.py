"""DICOM results of musclenode: SEG of the masks and TID 1500 SR of the measurements.

- :mod:`reports.seg` -- :func:`~reports.seg.build_seg`, :func:`~reports.seg.segment_numbers`
- :mod:`reports.sr` -- :func:`~reports.sr.build_sr` (Comprehensive 3D SR, TID 1500)
- :mod:`reports.longitudinal` -- :class:`~reports.longitudinal.PriorValue`,
  :class:`~reports.longitudinal.Comparison`, :func:`~reports.longitudinal.compare`
- :mod:`reports.trialstats` -- :func:`~reports.trialstats.annualised_changes`,
  :func:`~reports.trialstats.cohort_stats`, :func:`~reports.trialstats.correlation`,
  :func:`~reports.trialstats.by_group` (pure trial statistics for the stats API)
- :mod:`reports.pmap` -- :func:`~reports.pmap.build_parametric_maps` (FF, T2W, B1, FF_T2 maps)
- :mod:`reports.summary` -- :func:`~reports.summary.build_summary` (the one-page summary as
  Secondary Capture and Encapsulated PDF; :mod:`reports.summary_content` what it shows,
  :mod:`reports.summary_draw` its drawing)
- :mod:`reports.codes` -- every coded concept written (standard and ``99MUSCLENODE``)
- :mod:`reports.uids` -- :func:`~reports.uids.derive_uid` (deterministic UIDs)

The submodules are not imported here, so ``import reports.uids`` stays light (no highdicom).
"""
