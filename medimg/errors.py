"""The small error hierarchy of medimg.

Every message names the file, series key or parameter at fault (never a patient's name
or ID) and says what to do about it.
"""

from __future__ import annotations


class MedImgError(Exception):
    """Base class of every error medimg raises on purpose."""


class ConfigError(MedImgError):
    """A parameter file or value is wrong: the message names the key and the file."""


class DicomError(MedImgError):
    """A DICOM file or series cannot be used: the message names the file or series key."""


class DataError(MedImgError):
    """Labels, masks, manifests or splits are inconsistent."""


class TrackingError(MedImgError):
    """The MLflow store or registry refused or could not be reached after retries."""


class PacsError(MedImgError):
    """A PACS could not be reached, refused medimg or failed a transfer: the message names
    the server (address and AE title), never a credential or a patient."""
