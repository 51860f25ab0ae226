"""De-identification by the DICOM Basic Application Level Confidentiality Profile.

:data:`ANNEX_E` holds the attributes of PS3.15 Annex E Table E.1-1 with their Basic
Profile action. Combined actions are reduced to the strictest one implemented here:
``X/...`` deletes, ``Z/D`` empties, ``X/Z/U*`` remaps UIDs (and empties anything else).

Beyond the table, :func:`deidentify` is conservative: it removes private tags, curves,
overlays, command elements, every Person Name it does not know, and a few free-text or
network attributes the table misses (:data:`EXTRA_REMOVED`). UIDs that are not DICOM
registered ones are remapped, so references between instances keep pointing at each
other. Pixel data are left alone: burned-in text is only reported.

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
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import BYTES_VR, STR_VR

from medimg.errors import ConfigError, DicomError
from medimg.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

SALT_ENV = "MEDIMG_SALT"
METHOD = "medimg: PS3.15 Basic Application Level Confidentiality Profile"
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

# Table E.1-1 (2024b), Basic Profile column, by action code as the standard writes it.
_TABLE: dict[str, str] = {
    "D": """
    AcquisitionFieldOfViewLabel AnnotationGroupLabel AnnotationGroupUID AssertionDateTime
    AttributeModificationDateTime BeamHoldTransitionDateTime CertificateOfSigner
    ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolID ClinicalTrialSponsorName
    ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ContainerIdentifier ContentSequence
    ContextGroupLocalVersion ContextGroupVersion Date DateTime DecayCorrectionDateTime
    DestinationAE DeviceLabel DigitalSignatureDateTime EffectiveDateTime EncapsulatedDocument
    EntityLabel EntityLongLabel ExclusionStartDateTime FlowIdentifier FlowIdentifierSequence
    FrameAcquisitionDateTime FrameOriginTimestamp FrameReferenceDateTime FunctionalSyncPulse
    GraphicAnnotationSequence HangingProtocolCreationDateTime ImpedanceMeasurementDateTime
    InformationIssueDateTime InterlockDateTime InterlockDescription InterlockOriginDescription
    ModifyingSystem OverrideDateTime PersonIdentificationCodeSequence PersonName RTPlanLabel
    RTPrescriptionLabel RTToleranceSetLabel RadiationDoseIdentificationLabel
    RadiationDoseInVivoMeasurementLabel RadiationGenerationModeLabel
    ReasonForTheAttributeModification RecordedRTControlPointDateTime ReferencedDateTime
    SafePositionExitDate SafePositionExitTime SafePositionReturnDate SafePositionReturnTime
    SelectorAEValue SelectorASValue SelectorDAValue SelectorDTValue SelectorLOValue
    SelectorLTValue SelectorOBValue SelectorPNValue SelectorSHValue SelectorSTValue
    SelectorTMValue SelectorUNValue SelectorURValue SelectorUTValue SourceEndDateTime
    SourceIdentifier SourceStartDateTime SourceStrengthReferenceDate SourceStrengthReferenceTime
    SpecimenIdentifier StructureSetLabel Time TreatmentControlPointDate TreatmentControlPointTime
    TreatmentPositionGroupLabel TreatmentToleranceViolationDateTime
    TreatmentToleranceViolationDescription UserContentLabel UserContentLongLabel
    VerificationDateTime VerifyingObserverName VerifyingObserverSequence VerifyingOrganization
    XRayDetectorID XRaySourceID
    """,
    "Z": """
    AccessionNumber CalibrationDateTime ClinicalTrialCoordinatingCenterName
    ClinicalTrialProtocolName ClinicalTrialSiteID ClinicalTrialSiteName ClinicalTrialTimePointID
    ConceptualVolumeCombinationDescription ConceptualVolumeDescription ConsultingPhysicianName
    DeviceAlternateIdentifier FillerOrderNumberImagingServiceRequest FractionationNotes
    IssuerOfTheContainerIdentifierSequence IssuerOfTheSpecimenIdentifierSequence
    ManufacturerDeviceIdentifier ParticipationDateTime PatientBirthDate PatientName PatientSex
    PlacerOrderNumberImagingServiceRequest PrescriptionNotes PrescriptionNotesSequence
    ROIInterpreter ROIName RTAccessoryDeviceSlotID RTAccessoryHolderSlotID
    RTPhysicianIntentNarrative RadiationGenerationModeDescription ReasonForSuperseding
    ReferringPhysicianName ReviewDate ReviewTime SourceOfPreviousValues
    SpecimenPreparationSequence StructureSetDate StructureSetTime StudyDate StudyID StudyTime
    TreatmentTechniqueNotes VerifyingObserverIdentificationCodeSequence
    """,
    "X": """
    AcquisitionComments AcquisitionProtocolDescription ActualHumanPerformersSequence
    AdditionalPatientHistory AddressTrial AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence
    AdmittingDiagnosesDescription AdmittingTime AffectedSOPInstanceUID Allergies
    AnnotationGroupDescription ApprovalStatusDateTime Arbitrary AssertionExpirationDateTime
    AuthorObserverSequence BeamDescription BolusDescription BranchOfService CalibrationDate
    CalibrationTime CameraOwnerName CassetteID CertifiedTimestamp
    ClinicalTrialProtocolEthicsCommitteeApprovalNumber ClinicalTrialSeriesDescription
    ClinicalTrialSeriesID ClinicalTrialTimePointDescription CommentsOnRadiationDose
    CommentsOnThePerformedProcedureStep CompensatorDescription
    ConfidentialityConstraintOnPatientDataDescription ConsultingPhysicianIdentificationSequence
    ContainerComponentID ContainerDescription ContentCreatorIdentificationCodeSequence
    ContrastBolusStartTime ContrastBolusStopTime ContributionDateTime ContributionDescription
    CountryOfResidence CreationDate CreationTime CurrentObserverTrial CurrentPatientLocation
    CurveDate CurveTime CustodialOrganizationSequence DataSetTrailingPadding
    DateOfDocumentOrVerbalTransactionTrial DateOfInstallation DateOfLastCalibration
    DateOfManufacture DateOfSecondaryCapture DateTimeOfLastCalibration DecompositionDescription
    DerivationDescription DeviceDescription DeviceSettingDescription DigitalSignaturesSequence
    DischargeDate DischargeDiagnosisDescription DischargeTime DisplacementReferenceLabel
    DistributionAddress DistributionName DoseReferenceDescription EntityDescription EntityName
    EquipmentFrameOfReferenceDescription EthicsCommitteeApprovalEffectivenessEndDate
    EthicsCommitteeApprovalEffectivenessStartDate EthnicGroup ExpectedCompletionDateTime
    FilterLookupTableDescription FindingsGroupRecordingDateTrial FindingsGroupRecordingTimeTrial
    FixationDeviceDescription FractionGroupDescription FrameComments GPSAltitude GPSAltitudeRef
    GPSAreaInformation GPSDOP GPSDateStamp GPSDestBearing GPSDestBearingRef GPSDestDistance
    GPSDestDistanceRef GPSDestLatitude GPSDestLatitudeRef GPSDestLongitude GPSDestLongitudeRef
    GPSDifferential GPSImgDirection GPSImgDirectionRef GPSLatitude GPSLatitudeRef GPSLongitude
    GPSLongitudeRef GPSMapDatum GPSMeasureMode GPSProcessingMethod GPSSatellites GPSSpeed
    GPSSpeedRef GPSStatus GPSTimeStamp GPSTrack GPSTrackRef GPSVersionID GantryID GeneratorID
    HL7DocumentEffectiveTime HumanPerformerName HumanPerformerOrganization IconImageSequence
    IdentifyingComments ImageComments ImagePresentationComments ImagingServiceRequestComments
    Impressions InstanceCoercionDateTime InstanceOriginStatus InstitutionAddress
    InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence
    InsurancePlanIdentification IntendedFractionStartTime
    IntendedRecipientsOfResultsIdentificationSequence InterpretationApprovalDate
    InterpretationApprovalTime InterpretationApproverSequence InterpretationAuthor
    InterpretationDiagnosisDescription InterpretationID InterpretationIDIssuer
    InterpretationRecordedDate InterpretationRecordedTime InterpretationRecorder
    InterpretationText InterpretationTranscriber InterpretationTranscriptionDate
    InterpretationTranscriptionTime InterventionDrugStartTime InterventionDrugStopTime
    IssueDateOfImagingServiceRequest IssueTimeOfImagingServiceRequest IssuerOfAdmissionID
    IssuerOfAdmissionIDSequence IssuerOfClinicalTrialProtocolID IssuerOfClinicalTrialSeriesID
    IssuerOfClinicalTrialSiteID IssuerOfClinicalTrialSubjectID
    IssuerOfClinicalTrialSubjectReadingID IssuerOfClinicalTrialTimePointID IssuerOfPatientID
    IssuerOfServiceEpisodeID IssuerOfServiceEpisodeIDSequence LastMenstrualDate LensMake
    LensModel LensSerialNumber LensSpecification LongDeviceDescription MAC MakerNote
    MedicalAlerts MedicalRecordLocator MilitaryRank ModifiedAttributesSequence
    ModifiedImageDate ModifiedImageDescription ModifiedImageTime ModifyingDeviceID
    MultienergyAcquisitionDescription NameOfPhysiciansReadingStudy
    NamesOfIntendedRecipientsOfResults NetworkID NonconformingDataElementValue
    NonconformingModifiedAttributesSequence ObservationDateTrial ObservationStartDateTime
    ObservationTimeTrial Occupation OrderCallbackPhoneNumber OrderCallbackTelecomInformation
    OrderEnteredBy OrderEntererLocation OriginalAttributesSequence Originator
    OtherClinicalTrialProtocolIDsSequence OtherPatientIDs OtherPatientIDsSequence
    OtherPatientNames OverlayDate OverlayTime ParticipantSequence PatientComments
    PatientSetupPhotoDescription PatientState PatientTransportArrangements
    PatientTreatmentPreparationMethodDescription
    PatientTreatmentPreparationProcedureParameterDescription PatientAddress PatientAge
    PatientBirthName PatientBirthTime PatientInstitutionResidence PatientInsurancePlanCodeSequence
    PatientMotherBirthName PatientPrimaryLanguageCodeSequence
    PatientPrimaryLanguageModifierCodeSequence PatientReligiousPreference PatientSize
    PatientTelecomInformation PatientTelephoneNumbers PatientWeight PerformedLocation
    PerformedProcedureStepDescription PerformedProcedureStepEndDate
    PerformedProcedureStepEndDateTime PerformedProcedureStepEndTime PerformedProcedureStepID
    PerformedProcedureStepStartDate PerformedProcedureStepStartDateTime
    PerformedProcedureStepStartTime PerformedStationAETitle
    PerformedStationGeographicLocationCodeSequence PerformedStationName
    PerformedStationNameCodeSequence PerformingPhysicianIdentificationSequence
    PerformingPhysicianName PersonAddress PersonTelecomInformation PersonTelephoneNumbers
    PhysicianApprovingInterpretation PhysiciansReadingStudyIdentificationSequence
    PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence PlateID
    PositionAcquisitionTemplateDescription PositionAcquisitionTemplateName PreMedication
    PregnancyStatus PrescriptionDescription PresentationCreationDate PresentationCreationTime
    PriorTreatmentDoseDescription ProcedureStepCancellationDateTime ProductExpirationDateTime
    PyramidDescription PyramidLabel ROICreatorSequence ROIDateTime ROIDescription
    ROIGenerationDescription ROIInterpreterSequence ROIObservationDateTime
    ROIObservationDescription ROIObservationLabel RTPlanDescription RTPlanName
    RadiopharmaceuticalStartDateTime RadiopharmaceuticalStartTime
    RadiopharmaceuticalStopDateTime RadiopharmaceuticalStopTime ReasonForOmissionDescription
    ReasonForRequestedProcedureCodeSequence ReasonForStudy ReasonForVisit
    ReasonForVisitCodeSequence ReasonForTheImagingServiceRequest ReasonForTheRequestedProcedure
    ReceivingAE ReferencedDigitalSignatureSequence ReferencedPatientAliasSequence
    ReferencedPatientPhotoSequence ReferencedPatientSequence ReferencedSOPInstanceMACSequence
    ReferringPhysicianIdentificationSequence ReferringPhysicianAddress
    ReferringPhysicianTelephoneNumbers RegionOfResidence RequestAttributesSequence
    RequestedContrastAgent RequestedProcedureComments RequestedProcedureID
    RequestedProcedureLocation RequestedSeriesDescription RequestingAE RequestingPhysician
    RequestingService RespiratoryMotionCompensationTechniqueDescription ResponsibleOrganization
    ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsID ResultsIDIssuer
    RetrieveAETitle SOPAuthorizationDateTime ScheduledAdmissionDate ScheduledAdmissionTime
    ScheduledDischargeDate ScheduledDischargeTime ScheduledHumanPerformersSequence
    ScheduledPatientInstitutionResidence ScheduledPerformingPhysicianIdentificationSequence
    ScheduledPerformingPhysicianName ScheduledProcedureStepDescription
    ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime
    ScheduledProcedureStepExpirationDateTime ScheduledProcedureStepID
    ScheduledProcedureStepLocation ScheduledProcedureStepModificationDateTime
    ScheduledProcedureStepStartDate ScheduledProcedureStepStartDateTime
    ScheduledProcedureStepStartTime ScheduledStationAETitle
    ScheduledStationGeographicLocationCodeSequence ScheduledStationName
    ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
    ScheduledStudyStartDate ScheduledStudyStartTime ScheduledStudyStopDate ScheduledStudyStopTime
    SeriesDescription ServiceEpisodeDescription ServiceEpisodeID SetupTechniqueDescription
    ShieldingDeviceDescription SlideIdentifier SmokingStatus SourceManufacturer SpecialNeeds
    SpecimenAccessionNumber SpecimenDetailedDescription SpecimenShortDescription StationAETitle
    StructureSetDescription StructureSetName StudyArrivalDate StudyArrivalTime StudyComments
    StudyCompletionDate StudyCompletionTime StudyDescription StudyIDIssuer StudyReadDate
    StudyReadTime StudyVerifiedDate StudyVerifiedTime SubstanceAdministrationDateTime
    TelephoneNumberTrial TemplateLocalVersion TemplateVersion TextComments TextString
    TimeOfDocumentCreationOrVerbalTransactionTrial TimeOfLastCalibration TimeOfSecondaryCapture
    TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle
    TransducerIdentificationSequence TreatmentSites UDISequence UniqueDeviceIdentifier
    VerbalSourceTrial VerbalSourceIdentifierCodeSequenceTrial VisitComments XRayDetectorLabel
    WaveformFilterDescription
    """,
    "U": """
    AcquisitionUID ConcatenationUID ConceptualVolumeUID ConstituentConceptualVolumeUID DeviceUID
    DigitalSignatureUID DimensionOrganizationUID DoseReferenceUID DosimetricObjectiveUID
    FailedSOPInstanceUIDList FiducialUID FrameOfReferenceUID InstanceCreatorUID
    IrradiationEventUID LargePaletteColorLookupTableUID ManufacturerDeviceClassUID
    MediaStorageSOPInstanceUID MultiplexGroupUID ObservationSubjectUIDTrial ObservationUID
    PaletteColorLookupTableUID PatientSetupUID PresentationDisplayCollectionUID
    PresentationSequenceCollectionUID PyramidUID RTTreatmentPhaseUID
    ReferencedConceptualVolumeUID ReferencedDoseReferenceUID ReferencedDosimetricObjectiveUID
    ReferencedFiducialsUID ReferencedFrameOfReferenceUID
    ReferencedGeneralPurposeScheduledProcedureStepTransactionUID ReferencedObservationUIDTrial
    ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile ReferencedTreatmentPositionGroupUID
    RelatedFrameOfReferenceUID RequestedSOPInstanceUID SOPInstanceUID SeriesInstanceUID
    SourceConceptualVolumeUID SourceFrameOfReferenceUID SpecimenUID StorageMediaFileSetUID
    StudyInstanceUID SynchronizationFrameOfReferenceUID TargetUID TemplateExtensionCreatorUID
    TemplateExtensionOrganizationUID TrackingUID TransactionUID TreatmentPositionGroupUID
    TreatmentSessionUID UID
    """,
    "Z/D": """
    ContentCreatorName ContentDate ContentTime ContrastBolusAgent InstructionPerformedDateTime
    PatientID
    """,
    "X/Z": """
    AcquisitionContextSequence AcquisitionDate AcquisitionTime BarcodeValue LabelText
    PatientSexNeutered ReferencedStudySequence RequestedProcedureDescription ReviewerName
    SourceSerialNumber TreatmentMachineName
    """,
    "X/D": """
    AcquisitionDeviceProcessingDescription DateOfLastDetectorCalibration DetectorID
    EndAcquisitionDateTime FirstTreatmentDate InstanceCreationDate IntendedPhaseEndDate
    IntendedPhaseStartDate MostRecentTreatmentDate ObservationDateTime
    OperatorIdentificationSequence ProtocolName RTPlanDate RTPlanTime RTTreatmentApproachLabel
    SeriesDate SeriesTime StartAcquisitionDateTime TimeOfLastDetectorCalibration TreatmentDate
    TreatmentSite TreatmentTime
    """,
    "X/Z/D": """
    AcquisitionDateTime DeviceSerialNumber InstanceCreationTime InstitutionCodeSequence
    InstitutionName OperatorsName ReferencedPerformedProcedureStepSequence StationName
    """,
    "X/Z/U*": "ReferencedImageSequence SourceImageSequence",
}
_REDUCE = {"D": "D", "Z": "Z", "X": "X", "U": "U", "Z/D": "Z", "X/Z": "X", "X/D": "X"}
_REDUCE |= {"X/Z/D": "X", "X/Z/U*": "U"}

# Not in Table E.1-1 but identifying (free text, alternative-calendar dates, network
# addresses, issuers): removed as well.
_EXTRA = """
    PatientBirthDateInAlternativeCalendar PatientDeathDateInAlternativeCalendar
    PatientAlternativeCalendar PerformedProcedureTypeDescription AcquisitionProtocolName
    CommentsOnTheScheduledProcedureStep AcquisitionContextDescription
    IssuerOfAccessionNumberSequence IssuerOfPatientIDQualifiersSequence
    PlacerOrderNumberProcedure FillerOrderNumberProcedure SourceApplicationEntityTitle
    SendingApplicationEntityTitle ReceivingApplicationEntityTitle SourcePresentationAddress
    SendingPresentationAddress ReceivingPresentationAddress PrivateInformationCreatorUID
    PrivateInformation
"""
# UIDs that name classes, syntaxes or coding schemes, never an instance: kept as they are.
_KEEP_UIDS = """
    SOPClassUID MediaStorageSOPClassUID TransferSyntaxUID ImplementationClassUID
    ReferencedSOPClassUID ReferencedSOPClassUIDInFile ReferencedTransferSyntaxUIDInFile
    RelatedGeneralSOPClassUID OriginalSpecializedSOPClassUID CodingSchemeUID ContextUID
    MappingResourceUID ContextGroupExtensionCreatorUID
"""


def _tags(keywords: str) -> list[BaseTag]:
    """Resolve whitespace-separated keywords; fail at import on any unknown one."""
    tags: list[BaseTag] = []
    missing: list[str] = []
    for word in keywords.split():
        tag = tag_for_keyword(word)
        if tag is None:
            missing.append(word)
        else:
            tags.append(Tag(tag))
    if missing:
        raise RuntimeError(f"medimg.dicom.deid: unknown DICOM keywords {missing}")
    return tags


def _build_table() -> dict[BaseTag, str]:
    table: dict[BaseTag, str] = {}
    for code, keywords in _TABLE.items():
        for tag in _tags(keywords):
            if tag in table:
                raise RuntimeError(f"medimg.dicom.deid: {tag} listed twice in Table E.1-1")
            table[tag] = _REDUCE[code]
    return table


ANNEX_E: dict[BaseTag, str] = _build_table()
EXTRA_REMOVED: frozenset[BaseTag] = frozenset(_tags(_EXTRA))
_KEEP_UI: frozenset[BaseTag] = frozenset(_tags(_KEEP_UIDS))

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
        atomic_write_text(path, secrets.token_hex(32) + "\n")
        path.chmod(0o600)
        log.info("created a new de-identification salt at %s (keep it secret)", path)
    elif path.stat().st_mode & 0o077:
        log.warning("salt file %s is readable by others: chmod 600 it", path)
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ConfigError(f"{path}: salt file is empty; delete it to create a new one")
    return text.encode("utf-8")


class Pseudonymizer:
    """Deterministic keyed pseudonyms and UIDs (HMAC-SHA256 with a secret salt)."""

    __slots__ = ("_salt",)

    def __init__(self, salt: bytes) -> None:
        if not salt:
            raise ValueError("Pseudonymizer: the salt must not be empty")
        self._salt = bytes(salt)

    def __repr__(self) -> str:
        return "Pseudonymizer(salt=<hidden>)"

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


def _action(elem: DataElement, keep_private: bool) -> str | None:
    """What to do with ``elem``: ``X``, ``Z``, ``D``, ``U`` or None (keep)."""
    tag = elem.tag
    if tag.is_private:
        return None if keep_private else "X"
    if tag.group == 0x0000 or (tag.group & 0xFF00) in (0x5000, 0x6000):
        return "X"  # command elements, curves and overlays
    action = ANNEX_E.get(tag)
    if action is not None:
        return action
    if elem.VR == "PN" or tag in EXTRA_REMOVED:
        return "X"
    if elem.VR == "UI" and tag not in _KEEP_UI:
        values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        if any(v and not str(v).startswith("1.2.840.10008.") for v in values):
            return "U"  # an unlisted UID that is not a DICOM registered one
    return None


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
        action = _action(elem, keep_private)
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
        if _action(elem, keep_private=False) is not None:
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
        ds = pydicom.dcmread(src)
    except (pydicom.errors.InvalidDicomError, OSError) as exc:
        raise DicomError(f"{src}: cannot read as DICOM ({type(exc).__name__})") from exc
    out = deidentify(ds, pseudo, patient_pseudonym=patient_pseudonym)
    with atomic_path(Path(dst)) as tmp:
        pydicom.dcmwrite(tmp, out, enforce_file_format=True)
