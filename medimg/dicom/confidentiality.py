"""The DICOM Basic Application Level Confidentiality Profile, as rules on data elements.

:data:`ANNEX_E` holds the attributes of PS3.15 Annex E Table E.1-1 with their Basic
Profile action. Combined actions are reduced to the strictest one implemented here:
``X/...`` deletes, ``Z/D`` empties, ``X/Z/U*`` remaps UIDs (and empties anything else).

Beyond the table, :func:`action_for` is conservative: private tags, curves, overlays,
command elements, every Person Name it does not know, and a few free-text or network
attributes the table misses (:data:`EXTRA_REMOVED`) are removed. UIDs that are not DICOM
registered ones are remapped. :mod:`medimg.dicom.deid` applies these actions.
"""

from __future__ import annotations

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

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


def action_for(elem: DataElement, keep_private: bool) -> str | None:
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
