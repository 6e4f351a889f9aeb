"""DICOM networking: the DIMSE boundary, where domain errors become status codes."""
