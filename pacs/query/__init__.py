"""Query: DICOM identifiers to indexed SQL (PS3.4 C.2.2.2 matching)."""
