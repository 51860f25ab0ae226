"""DICOM: discovery, series assembly, geometry, pixels, de-identification, synthesis."""
