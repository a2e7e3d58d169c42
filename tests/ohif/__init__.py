"""OHIF Viewer 3 against Orthanc's DICOMweb, for tests/test_ohif.py (test tooling)."""
