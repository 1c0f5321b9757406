"""Write an RGB canvas as a DICOM whole-slide image: one VL WSI instance per pyramid level.

Shaped like the slides of the IDC collection (JPEG Baseline frames in YBR_FULL_422, TILED_FULL,
PixelSpacing in the shared functional groups, one series, one instance per level), written with
pydicom alone: each level is JPEG-encoded tile by tile once (Pillow), so a simulated slide of a
few thousand pixels a side takes well under a second to write and nothing is transcoded twice.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from marrowdx import taxonomy
from marrowdx.slides.detect import WSI_SOP_CLASS

#: JPEG quality of the tile frames (the collection's scanner writes about this).
TILE_QUALITY = 90


@dataclass(frozen=True)
class SlideIdentity:
    """Patient/study/series identity shared by every object of one slide."""

    patient_id: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    container_id: str
    diagnosis: str | None = None  # one of taxonomy.DIAGNOSES, written as its NCIt code
    diagnosis_text: str | None = None  # free text when it is not one of ours

    @staticmethod
    def new(patient_id: str, diagnosis: str | None = None, *, seed: str | None = None):
        """Fresh UIDs; deterministic when ``seed`` is given (same seed, same UIDs)."""

        def uid(kind: str) -> str:
            return generate_uid(entropy_srcs=[seed, patient_id, kind] if seed else None)

        return SlideIdentity(
            patient_id=patient_id,
            study_uid=uid("study"),
            series_uid=uid("series"),
            frame_of_reference_uid=uid("frame"),
            container_id=f"{patient_id}-S1",
            diagnosis=diagnosis,
        )


def _code(concept: taxonomy.CodedConcept | Code) -> Dataset:
    ds = Dataset()
    ds.CodeValue = concept.value
    ds.CodingSchemeDesignator = (
        concept.scheme if isinstance(concept, taxonomy.CodedConcept) else concept.scheme_designator
    )
    ds.CodeMeaning = concept.meaning
    return ds


@cache
def srgb_icc_profile() -> bytes:
    """An sRGB ICC profile for the optical path: an RGB image without one is refused by
    DICOM validators and viewers warn and guess. The simulator renders in sRGB.

    LittleCMS stamps the creation time into the header (bytes 24:36) and writes a display
    ('mntr') profile; zeroing the date keeps the files reproducible, and DICOM asks for an
    input-device ('scnr') profile class (PS3.3 C.11.15.1.1), the colorimetry being the same.
    """
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[24:36] = bytes(12)
    profile[12:16] = b"scnr"
    return bytes(profile)


def _encode_tile(tile: np.ndarray) -> bytes:
    """JPEG Baseline, 4:2:2 chroma subsampling (what YBR_FULL_422 declares)."""
    buf = io.BytesIO()
    Image.fromarray(tile, "RGB").save(buf, format="JPEG", quality=TILE_QUALITY, subsampling=1)
    return buf.getvalue()


def _frames(level: np.ndarray, tile: int) -> list[bytes]:
    """Row-major tiles (TILED_FULL order), edge tiles padded with white to full size."""
    h, w = level.shape[:2]
    rows, cols = -(-h // tile), -(-w // tile)
    padded = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    padded[:h, :w] = level
    return [
        _encode_tile(padded[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile])
        for r in range(rows)
        for c in range(cols)
    ]


def _level_dataset(
    ident: SlideIdentity,
    shape: tuple[int, int],
    tile: int,
    um_per_pixel: float,
    downsample: int,
    n_frames: int,
    instance_number: int,
    when: dt.datetime,
) -> Dataset:
    h, w = shape
    ds = Dataset()
    ds.SOPClassUID = WSI_SOP_CLASS
    ds.SOPInstanceUID = generate_uid(
        entropy_srcs=[ident.series_uid, str(downsample)] if ident.series_uid else None
    )
    ds.StudyInstanceUID = ident.study_uid
    ds.SeriesInstanceUID = ident.series_uid
    ds.FrameOfReferenceUID = ident.frame_of_reference_uid
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.Modality = "SM"
    ds.PatientID = ident.patient_id
    ds.PatientName = f"Simulated^{ident.patient_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.StudyDescription = "Bone marrow aspirate smear, simulated (marrowdx)"
    ds.SeriesDescription = "Bone marrow aspirate smear, May-Gruenwald-Giemsa stain"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    if ident.diagnosis is not None:
        ds.AdmittingDiagnosesCodeSequence = DicomSequence(
            [_code(taxonomy.DIAGNOSIS_CODES[ident.diagnosis])]
        )
    if ident.diagnosis_text is not None:
        ds.AdmittingDiagnosesDescription = ident.diagnosis_text
    ds.Manufacturer = "marrowdx"
    ds.ManufacturerModelName = "marrowdx simulate --format dicom"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "marrowdx"
    # image
    base = downsample == 1
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        if base
        else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    )
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.Rows = tile
    ds.Columns = tile
    ds.NumberOfFrames = n_frames
    ds.TotalPixelMatrixColumns = w
    ds.TotalPixelMatrixRows = h
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = 10
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.BurnedInAnnotation = "NO"
    ds.SpecimenLabelInImage = "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    spacing_mm = um_per_pixel * downsample / 1000.0
    ds.ImagedVolumeWidth = w * spacing_mm
    ds.ImagedVolumeHeight = h * spacing_mm
    ds.ImagedVolumeDepth = 0.001
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 20.0
    origin.YOffsetInSlideCoordinateSystem = 40.0
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    # TILED_FULL: the frame order is implied, so one dimension organization and no index
    organization = Dataset()
    organization.DimensionOrganizationUID = generate_uid(
        entropy_srcs=[ident.series_uid, "dimension-organization"]
    )
    ds.DimensionOrganizationSequence = DicomSequence([organization])
    measures = Dataset()
    measures.PixelSpacing = [round(spacing_mm, 10), round(spacing_mm, 10)]
    measures.SliceThickness = 0.001
    measures.SpacingBetweenSlices = 0.001
    optical_ref = Dataset()
    optical_ref.OpticalPathIdentifier = "1"
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.OpticalPathIdentificationSequence = DicomSequence([optical_ref])
    frame_type = Dataset()
    frame_type.FrameType = ds.ImageType  # every frame is what the image is
    shared.WholeSlideMicroscopyImageFrameTypeSequence = DicomSequence([frame_type])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    optical.IlluminationTypeCodeSequence = DicomSequence([_code(codes.DCM.BrightfieldIllumination)])
    optical.IlluminationColorCodeSequence = DicomSequence([_code(codes.SCT.FullSpectrum)])
    optical.ICCProfile = srgb_icc_profile()
    optical.ColorSpace = "SRGB"
    ds.NumberOfOpticalPaths = 1
    ds.OpticalPathSequence = DicomSequence([optical])
    ds.AcquisitionContextSequence = DicomSequence([])
    # specimen / container
    ds.ContainerIdentifier = ident.container_id
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence([])
    ds.ContainerTypeCodeSequence = DicomSequence([_code(codes.SCT.MicroscopeSlide)])
    specimen = Dataset()
    specimen.SpecimenIdentifier = ident.container_id
    specimen.SpecimenUID = generate_uid(entropy_srcs=[ident.series_uid, "specimen"])
    specimen.IssuerOfTheSpecimenIdentifierSequence = DicomSequence([])
    specimen.SpecimenPreparationSequence = DicomSequence([])
    ds.SpecimenDescriptionSequence = DicomSequence([specimen])
    return ds


def pyramid(canvas: np.ndarray, tile: int) -> list[np.ndarray]:
    """The canvas and its 2x reductions until a level fits in one tile."""
    levels = [canvas]
    while max(levels[-1].shape[:2]) > tile:
        img = Image.fromarray(levels[-1], "RGB").reduce(2)
        levels.append(np.asarray(img))
    return levels


def write_wsi(
    canvas: np.ndarray,
    out_dir: Path,
    ident: SlideIdentity,
    *,
    um_per_pixel: float,
    tile: int = 1024,
    when: dt.datetime | None = None,
) -> list[Path]:
    """Write ``canvas`` (H, W, 3 uint8) as one VL WSI instance per pyramid level in out_dir.

    Returns the files, base level first (``level_0.dcm``, ``level_1.dcm``, ...).
    """
    if canvas.ndim != 3 or canvas.shape[2] != 3 or canvas.dtype != np.uint8:
        raise ValueError(f"canvas must be (H, W, 3) uint8, got {canvas.shape} {canvas.dtype}")
    if um_per_pixel <= 0:
        raise ValueError(f"um_per_pixel must be > 0, got {um_per_pixel}")
    if tile % 16:
        raise ValueError(f"tile side must be a multiple of 16 (JPEG MCUs), got {tile}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    when = when or dt.datetime(2026, 1, 1, 12, 0, 0)
    paths = []
    for i, level in enumerate(pyramid(canvas, tile)):
        frames = _frames(level, tile)
        ds = _level_dataset(
            ident, level.shape[:2], tile, um_per_pixel, 2**i, len(frames), i + 1, when
        )
        ds.PixelData = encapsulate(frames, has_bot=True)
        ds["PixelData"].VR = "OB"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.preamble = b"\x00" * 128
        path = out_dir / f"level_{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
