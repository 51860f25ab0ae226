"""De-identification by the DICOM Basic Application Level Confidentiality Profile.

:mod:`medimg.dicom.confidentiality` holds the profile: PS3.15 Annex E Table E.1-1 and
what to do, beyond the table, with the attributes it does not list. Here those actions
are applied: :func:`deidentify` removes private tags, curves, overlays, command elements,
every Person Name it does not know, and a few free-text or network attributes the table
misses. UIDs that are not DICOM registered ones are remapped, so references between
instances keep pointing at each other. Pixel data are left alone: burned-in text is only
reported.

Pseudonyms and UIDs come from a keyed hash (HMAC-SHA256) with a secret salt: the same
salt maps the same patient and UIDs to the same values in every run, and without the
salt they cannot be recomputed from a guess of the original.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import BYTES_VR, STR_VR

from medimg.config import IngestParams

# The profile's names stay importable from here, where they were defined before.
from medimg.dicom.confidentiality import ANNEX_E as ANNEX_E
from medimg.dicom.confidentiality import EXTRA_REMOVED as EXTRA_REMOVED
from medimg.dicom.confidentiality import METHOD as METHOD
from medimg.dicom.confidentiality import PROFILE_CODE as PROFILE_CODE
from medimg.dicom.confidentiality import action_for
from medimg.dicom.read import dcmread
from medimg.errors import ConfigError, DicomError
from medimg.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

SALT_ENV = "MEDIMG_SALT"
# The built-in synthetic cohort holds no patient, so its pseudonyms may use a key that is
# public: then every machine derives the same pseudonyms and the same patient split from it,
# and the demo's results repeat (``medimg synth`` writes this salt when there is none yet).
# Ingest refuses any file the generator did not write while this salt is in use.
DEMO_SALT = "medimg-demo-synthetic-data-only"  # also what `make demo` puts in $MEDIMG_SALT
SYNTHETIC_CREATOR = "MEDIMG SYNTH"  # the generator's private creator, (0019,0010)

_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y"}
_DUMMY |= {"IS": "0", "DS": "0"}
_SHORT_VRS = {"AE", "CS", "SH"}  # at most 16 characters
_PSEUDONYM = re.compile(r"[A-Za-z0-9._-]{1,64}")


def load_or_create_salt(path: Path) -> bytes:
    """The secret key of every keyed hash, as UTF-8 bytes of a secret text.

    ``$MEDIMG_SALT`` wins when set. Otherwise the text is read from ``path``, which is
    created (32 random bytes, hex-encoded, mode 0600, written atomically) when missing.
    Putting the file's content in ``$MEDIMG_SALT`` gives the same key. The salt is never
    logged.

    Raises:
        ConfigError: the variable or the file is empty.
    """
    from_env = os.environ.get(SALT_ENV)
    if from_env is not None:
        if not from_env.strip():
            raise ConfigError(f"{SALT_ENV} is set but empty: unset it or set a long secret")
        return from_env.strip().encode("utf-8")
    path = Path(path)
    if not path.exists():
        _write_salt(path, secrets.token_hex(32))
        log.info("created a new de-identification salt at %s (keep it secret)", path)
    elif path.stat().st_mode & 0o077:
        log.warning("salt file %s is readable by others: chmod 600 it", path)
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ConfigError(f"{path}: salt file is empty; delete it to create a new one")
    return text.encode("utf-8")


def _write_salt(path: Path, text: str) -> None:
    """A salt file: written atomically, readable by its owner only."""
    atomic_write_text(path, text + "\n")
    path.chmod(0o600)


def write_demo_salt(path: Path) -> bool:
    """Write the synthetic cohort's public salt (:data:`DEMO_SALT`) to ``path`` unless a
    salt file is there already or ``$MEDIMG_SALT`` is set; True when it did."""
    path = Path(path)
    if path.exists() or os.environ.get(SALT_ENV) is not None:
        return False
    _write_salt(path, DEMO_SALT)
    log.info("wrote the synthetic cohort's public salt to %s (delete it before real data)", path)
    return True


def from_generator(ds: Dataset) -> bool:
    """Whether medimg's generator wrote ``ds``: its private creator at (0019,0010)."""
    elem = ds.get(0x00190010)
    return elem is not None and str(elem.value).strip() == SYNTHETIC_CREATOR


def refuse_real_files(files: Iterable[tuple[Path, bool]], cfg: IngestParams, root: Path) -> None:
    """Stop before anything is written when the public salt (:data:`DEMO_SALT`) would
    pseudonymise a file the generator did not write (``files``: path, from the generator).

    Raises:
        ConfigError: naming the first such file, relative to ``root``.
    """
    real = next((path for path, synthetic in files if not synthetic), None)
    if real is not None:
        where = real.relative_to(root) if real.is_relative_to(root) else real
        source = f"${SALT_ENV}" if os.environ.get(SALT_ENV) is not None else cfg.salt_file
        raise ConfigError(
            f"{where}: not a file of the synthetic cohort, but the pseudonym key ({source}) "
            "is the synthetic cohort's public one: unset $MEDIMG_SALT, or delete the salt "
            "file medimg synth wrote, and ingest again (a secret salt is made)"
        )


def is_demo_salt(salt: bytes) -> bool:
    """Whether ``salt`` is the public one of the synthetic cohort."""
    return salt == DEMO_SALT.encode("utf-8")


class Pseudonymizer:
    """Deterministic keyed pseudonyms and UIDs (HMAC-SHA256 with a secret salt)."""

    __slots__ = ("_salt",)

    def __init__(self, salt: bytes) -> None:
        if not salt:
            raise ValueError("Pseudonymizer: the salt must not be empty")
        self._salt = bytes(salt)

    def __repr__(self) -> str:
        return "Pseudonymizer(salt=<hidden>)"

    @property
    def public(self) -> bool:
        """Whether the key is the synthetic cohort's public one (:data:`DEMO_SALT`)."""
        return is_demo_salt(self._salt)

    def _digest(self, message: str) -> str:
        return hmac.new(self._salt, message.encode("utf-8"), hashlib.sha256).hexdigest()

    def key(self, kind: str, value: str, n: int = 16) -> str:
        """First ``n`` hex characters (1 to 64) of HMAC(salt, ``kind:value``): file-name safe."""
        if not 1 <= n <= 64:
            raise ValueError(f"Pseudonymizer.key: n must be 1 to 64, got {n}")
        return self._digest(f"{kind}:{value}")[:n]

    def uid(self, original: str) -> str:
        """``2.25.`` and the first 128 bits of HMAC(salt, ``uid:original``) in decimal."""
        return f"2.25.{int(self._digest(f'uid:{original}')[:32], 16)}"


def _remap(elem: DataElement, pseudo: Pseudonymizer) -> None:
    if isinstance(elem.value, MultiValue):
        elem.value = [pseudo.uid(str(v)) if v else v for v in elem.value]
    elif elem.value:
        elem.value = pseudo.uid(str(elem.value))


def _dummy(elem: DataElement, pseudo: Pseudonymizer) -> None:
    vr = elem.VR
    if vr == "SQ":
        elem.value = Sequence()
    elif vr == "UI":
        _remap(elem, pseudo)
    elif vr in _DUMMY:
        elem.value = _DUMMY[vr]
    elif vr in STR_VR:
        elem.value = "ANONYMIZED"[: 16 if vr in _SHORT_VRS else 64]
    elif vr in BYTES_VR:
        elem.value = b"\x00" * 8  # a whole number of 2, 4 and 8 byte words
    elif vr in {"FL", "FD", "SL", "SS", "UL", "US", "SV", "UV"}:
        elem.value = 0
    else:
        elem.clear()


def _clean(ds: Dataset, pseudo: Pseudonymizer, keep_private: bool, done: Counter[str]) -> None:
    """Apply the actions to ``ds`` in place, recursively."""
    for tag in list(ds.keys()):
        elem = ds[tag]
        action = action_for(elem, keep_private)
        if action == "X":
            del ds[tag]
        elif action == "Z" or (action == "U" and elem.VR not in ("UI", "SQ")):
            elem.clear()
        elif action == "D":
            _dummy(elem, pseudo)
        elif action == "U" and elem.VR == "UI":
            _remap(elem, pseudo)
        if action is not None:
            done[action] += 1
        if tag in ds and elem.VR == "SQ":
            for item in elem.value:
                _clean(item, pseudo, keep_private, done)


def deidentify(
    ds: Dataset, pseudo: Pseudonymizer, *, patient_pseudonym: str, keep_private: bool = False
) -> Dataset:
    """A de-identified deep copy of ``ds`` (file meta included); ``ds`` is not modified.

    PatientName and PatientID become ``patient_pseudonym`` (letters, digits, ``._-``, at
    most 64, e.g. from :meth:`Pseudonymizer.key`), and the dataset is marked as
    de-identified by the Basic Profile (code 113100, DCM).

    Raises:
        ValueError: ``patient_pseudonym`` is not of that form (the message omits it).
    """
    if not _PSEUDONYM.fullmatch(patient_pseudonym):
        raise ValueError("deidentify: patient_pseudonym must be 1-64 of [A-Za-z0-9._-]")
    out = copy.deepcopy(ds)
    done: Counter[str] = Counter()
    _clean(out, pseudo, keep_private, done)
    if getattr(out, "file_meta", None) is not None:
        _clean(out.file_meta, pseudo, keep_private, done)
    out.PatientName = patient_pseudonym
    out.PatientID = patient_pseudonym
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
    out.DeidentificationMethodCodeSequence = [code]
    out.LongitudinalTemporalInformationModified = "REMOVED"
    if str(out.get("BurnedInAnnotation", "")).upper() == "YES":
        log.warning("an image has burned-in annotation: its pixels may still show PHI")
    log.debug(
        "de-identified: %d removed, %d emptied, %d replaced, %d UIDs remapped",
        *(done[a] for a in "XZDU"),
    )
    return out


def _strings(elem: DataElement) -> Iterator[str]:
    """Every non-empty text value in ``elem``, through sequences (printable bytes too)."""
    if elem.VR == "SQ":
        for item in elem.value:
            for inner in item:
                yield from _strings(inner)
    elif elem.VR in STR_VR and elem.value is not None:
        values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        yield from (str(v).strip() for v in values if str(v).strip())
    elif isinstance(elem.value, bytes):  # text in OB or UN, e.g. private tags read as UN
        text = elem.value.decode("latin-1").strip("\x00 ")
        if text and text.isprintable():
            yield text


def _phi(ds: Dataset, found: set[str]) -> None:
    for elem in ds:
        if action_for(elem, keep_private=False) is not None:
            found.update(_strings(elem))
        elif elem.VR == "SQ":
            for item in elem.value:
                _phi(item, found)


def phi_values(ds: Dataset) -> set[str]:
    """Every non-empty text value that :func:`deidentify` changes or removes.

    That is, recursively and file meta included, the values of the attributes Table E.1-1
    says to change (D, Z, X, U), of private tags and of the other attributes removed: what
    a canary test checks never reaches a de-identified file.
    """
    found: set[str] = set()
    _phi(ds, found)
    if getattr(ds, "file_meta", None) is not None:
        _phi(ds.file_meta, found)
    return found


def write_deidentified(
    src: Path, dst: Path, pseudo: Pseudonymizer, *, patient_pseudonym: str
) -> None:
    """Read ``src``, de-identify it and write ``dst`` atomically as a DICOM file.

    Raises:
        DicomError: ``src`` cannot be read as DICOM.
    """
    try:
        ds = dcmread(src)
    except (pydicom.errors.InvalidDicomError, OSError) as exc:
        raise DicomError(f"{src}: cannot read as DICOM ({type(exc).__name__})") from exc
    out = deidentify(ds, pseudo, patient_pseudonym=patient_pseudonym)
    with atomic_path(Path(dst)) as tmp:
        pydicom.dcmwrite(tmp, out, enforce_file_format=True)
