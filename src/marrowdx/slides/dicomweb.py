"""Slides in a DICOMweb archive: read one slide and its annotation series, store results back.

Where digital pathology runs, slides live in a PACS or VNA reached over DICOMweb rather than
in folders. ``WebSlide(endpoint, study, series).open_source()`` gives the same slide object
as ``reader.open_slide(folder)`` (a ``SlideSource``: ROIs, fields, frames, ground truth), so
``diagnose`` counts an archived slide exactly as a folder:

- QIDO-RS finds the study's VL whole-slide image series (the one given, or the only one) and
  its annotation series; WADO-RS metadata gives each pyramid level's header; the ROIs come
  from the ROI series as for a folder (``reader.annotated_rois``), or from the ROI finder
  when the slide has none;
- the pixels are read through wsidicom's DICOMweb client (``WsiDicom.open_web``), frames as
  stored (JPEG Baseline is asked for first, so a baseline slide's frames arrive unchanged);
- annotation objects are retrieved whole (WADO-RS instance, DICOM Part 10) rather than as
  DICOM JSON: some archives (Orthanc 1.10) cut float arrays to their first value in JSON;
- ``WebSlide.store(path)`` sends a written result object back with STOW-RS.

Archives that need them get a bearer token (``Authorization: Bearer``) and a CA bundle for
TLS (``DicomWebEndpoint``). Every failure (unreachable, refused, unknown study, no slide
series) is a ``SlideError`` that names the archive and what to do.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from marrowdx.slides.base import SlideError
from marrowdx.slides.detect import ANN_SOP_CLASS, WSI_SOP_CLASS

if TYPE_CHECKING:
    from marrowdx.slides.annotations import AnnotationObject
    from marrowdx.slides.reader import SlideSource

#: Environment variable read for the bearer token when no token file is given: a token on
#: the command line would show in the process list.
TOKEN_ENV = "MARROWDX_DICOMWEB_TOKEN"
#: Seconds one DICOMweb request may take (a frame, a metadata document, a STOW).
DEFAULT_TIMEOUT_S = 60.0
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
_T = TypeVar("_T")

# DICOM JSON tags (QIDO-RS answers)
_MODALITY = "00080060"
_SERIES_UID = "0020000E"
_SOP_UID = "00080018"
_SOP_CLASS = "00080016"
_PATIENT_ID = "00100020"
_SERIES_DESCRIPTION = "0008103E"


def _value(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


@dataclass(frozen=True)
class DicomWebEndpoint:
    """A DICOMweb service root (QIDO-RS, WADO-RS and STOW-RS under one URL, e.g.
    ``https://pacs.example.org/dicom-web``), with the credentials it needs."""

    url: str
    token: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise SlideError(f"DICOMweb URL {self.url!r}: expected http:// or https://")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise SlideError(f"CA file {self.ca_file} not found")
        if self.token is not None and not self.token.strip():
            raise SlideError("the DICOMweb bearer token is empty")

    @property
    def root(self) -> str:
        return self.url.rstrip("/")

    def client(self):
        """A ``dicomweb_client.DICOMwebClient`` with the token and CA applied, no retries
        (a failure is reported at once, naming the archive)."""
        import requests
        from dicomweb_client import DICOMwebClient

        session = requests.Session()
        if self.ca_file is not None:
            session = _session_trusting(str(self.ca_file))
        headers = {"Authorization": f"Bearer {self.token.strip()}"} if self.token else None
        client = DICOMwebClient(self.root, session=session, headers=headers, timeout=self.timeout_s)
        client.set_http_retry_params(retry=False)
        return client

    def call(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run one request; its failure becomes a SlideError saying what to change."""
        import requests

        try:
            return fn()
        except requests.exceptions.SSLError as exc:
            raise SlideError(
                f"DICOMweb {self.root}: TLS failed while {what} ({exc}); give the archive's "
                "CA certificate (--dicomweb-ca PEM)"
            ) from exc
        except requests.exceptions.ConnectionError as exc:
            raise SlideError(f"DICOMweb {self.root}: cannot connect while {what}: {exc}") from exc
        except requests.exceptions.Timeout as exc:
            raise SlideError(
                f"DICOMweb {self.root}: no answer in {self.timeout_s:.0f} s while {what}"
            ) from exc
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            hint = ""
            if status in (401, 403):
                hint = (
                    f"; the archive wants credentials: a bearer token (--dicomweb-token-file "
                    f"or ${TOKEN_ENV})"
                )
            elif status == 404:
                hint = "; check the URL (the DICOMweb root) and the UIDs"
            raise SlideError(f"DICOMweb {self.root}: HTTP {status} while {what}{hint}") from exc


def _session_trusting(ca_file: str):
    """A requests session that verifies TLS against ``ca_file`` whatever the environment
    says: requests lets $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE override ``session.verify``,
    which would silently drop the archive's CA on machines that set them."""
    import requests

    class PinnedSession(requests.Session):
        def merge_environment_settings(self, url, proxies, stream, verify, cert):
            merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
            merged["verify"] = ca_file
            return merged

    session = PinnedSession()
    session.verify = ca_file
    return session


class WebLocation(str):
    """How an archived slide is named in reports and errors (its WADO-RS URL); ``name`` is
    the study UID, as a folder's name is for a slide folder."""

    study: str

    def __new__(cls, text: str, study: str) -> WebLocation:
        obj = super().__new__(cls, text)
        obj.study = study
        return obj

    @property
    def name(self) -> str:
        return self.study


def _dataset_from_json(item: dict):
    import pydicom

    # Bulk data (ICC profile, pixels) is not needed to tile or to reference a level.
    return pydicom.Dataset.from_json(item, bulk_data_uri_handler=lambda *_: None)


def _volume(ds) -> bool:
    image_type = [str(v).upper() for v in getattr(ds, "ImageType", [])]
    return len(image_type) < 3 or image_type[2] == "VOLUME"


@dataclass(frozen=True)
class WebSlide:
    """One slide in a DICOMweb archive: a study, and the VL WSI series within it when the
    study holds more than one. ``store_results``: send result objects back (``store``)."""

    endpoint: DicomWebEndpoint
    study: str
    series: str | None = None
    store_results: bool = False

    @property
    def name(self) -> str:
        """The slide's WADO-RS URL: how it is named in the report."""
        url = f"{self.endpoint.root}/studies/{self.study}"
        return f"{url}/series/{self.series}" if self.series else url

    def _series(self, client) -> list[dict]:
        found = self.endpoint.call(
            f"searching study {self.study}",
            lambda: client.search_for_series(self.study, get_remaining=True),
        )
        if not found:
            raise SlideError(f"DICOMweb {self.endpoint.root}: no study {self.study}")
        return found

    def patient_id(self) -> str:
        """The study's PatientID (QIDO-RS), else the study UID: the report's patient."""
        client = self.endpoint.client()
        found = self.endpoint.call(
            f"searching study {self.study}",
            lambda: client.search_for_studies(
                search_filters={"StudyInstanceUID": self.study}, fields=["PatientID"]
            ),
        )
        if not found:
            raise SlideError(f"DICOMweb {self.endpoint.root}: no study {self.study}")
        return _value(found[0], _PATIENT_ID) or self.study

    def _slide_series(self, series: list[dict]) -> str:
        slides = [_value(s, _SERIES_UID) for s in series if _value(s, _MODALITY) == "SM"]
        if self.series is not None:
            if self.series not in slides:
                raise SlideError(
                    f"{self.name}: not a slide (SM) series of the study; its SM series: "
                    + (", ".join(str(s) for s in slides) or "none")
                )
            return self.series
        if not slides:
            raise SlideError(f"{self.name}: no slide (SM) series in the study")
        if len(slides) > 1:
            listed = ", ".join(str(s) for s in slides)
            raise SlideError(
                f"{self.name}: {len(slides)} slide (SM) series in the study; give one with "
                f"--series: {listed}"
            )
        return str(slides[0])

    def _levels(self, client, series_uid: str):
        from pydicom.dataset import FileMetaDataset

        from marrowdx.slides.reader import Level

        instances = self.endpoint.call(
            f"listing series {series_uid}",
            lambda: client.search_for_instances(self.study, series_uid, get_remaining=True),
        )
        volumes = []
        for item in instances:
            if _value(item, _SOP_CLASS) not in (None, WSI_SOP_CLASS):
                continue
            uid = str(_value(item, _SOP_UID))
            meta = self.endpoint.call(
                f"reading the metadata of {uid}",
                lambda uid=uid: client.retrieve_instance_metadata(self.study, series_uid, uid),
            )
            ds = _dataset_from_json(meta)
            if _volume(ds):
                volumes.append(ds)
        if not volumes:
            raise SlideError(f"slide {self.name}: missing levels: no VOLUME whole-slide image")
        volumes.sort(key=lambda d: -int(d.TotalPixelMatrixColumns))
        base = volumes[0]
        try:
            base.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1]
        except (AttributeError, IndexError) as exc:
            raise SlideError(f"slide {self.name}: the base level has no PixelSpacing") from exc
        bw = int(base.TotalPixelMatrixColumns)
        levels = [
            Level(
                path=Path(f"{self.endpoint.root}/studies/{self.study}/series/{series_uid}"),
                sop_instance_uid=str(d.SOPInstanceUID),
                width=int(d.TotalPixelMatrixColumns),
                height=int(d.TotalPixelMatrixRows),
                tile_width=int(d.Columns),
                tile_height=int(d.Rows),
                downsample=max(1, round(bw / int(d.TotalPixelMatrixColumns))),
            )
            for d in volumes
        ]
        base.file_meta = FileMetaDataset()
        return levels, base

    def _annotations(
        self, client, series: list[dict], level_uids: set[str], into: Path
    ) -> list[AnnotationObject]:
        """Every annotation object of the study that is drawn on this slide, retrieved whole
        into ``into`` and opened with the one annotation reader."""
        from marrowdx.slides.annotations import load_annotation_object

        out = []
        for s in series:
            if _value(s, _MODALITY) != "ANN":
                continue
            series_uid = str(_value(s, _SERIES_UID))
            instances = self.endpoint.call(
                f"listing annotation series {series_uid}",
                lambda series_uid=series_uid: client.search_for_instances(
                    self.study, series_uid, get_remaining=True
                ),
            )
            for item in instances:
                if _value(item, _SOP_CLASS) not in (None, ANN_SOP_CLASS):
                    continue
                uid = str(_value(item, _SOP_UID))
                ds = self.endpoint.call(
                    f"retrieving annotation object {uid}",
                    lambda series_uid=series_uid, uid=uid: client.retrieve_instance(
                        self.study, series_uid, uid
                    ),
                )
                path = into / f"ann_{len(out)}.dcm"
                ds.save_as(path, enforce_file_format=True)
                obj = load_annotation_object(path)
                if obj.referenced_instances and not set(obj.referenced_instances) & level_uids:
                    path.unlink()  # another slide's annotations in the same study
                    continue
                out.append(obj)
        return out

    def open_source(self, rois: str = "auto") -> SlideSource:
        """Open the archived slide (levels, annotation series, ROIs); SlideError naming the
        archive and the problem when it cannot be used. ``rois`` as for ``open_slide``:
        the ROI annotation series when there is one (``auto``), else the monolayer areas
        found automatically; ``annotation`` requires the series, ``automatic`` ignores it."""
        from wsidicom import WsiDicom, WsiDicomWebClient

        from marrowdx.slides.reader import ROI_CHOICES, annotated_rois
        from marrowdx.slides.roi_finder import use_automatic_rois

        if rois not in ROI_CHOICES:
            raise ValueError(f"rois must be one of {', '.join(ROI_CHOICES)}, got {rois!r}")

        client = self.endpoint.client()
        series = self._series(client)
        series_uid = self._slide_series(series)
        levels, base = self._levels(client, series_uid)
        location = WebLocation(
            f"{self.endpoint.root}/studies/{self.study}/series/{series_uid}", self.study
        )
        workdir = Path(tempfile.mkdtemp(prefix="marrowdx-dicomweb-"))
        try:
            level_uids = {lv.sop_instance_uid for lv in levels}
            annotations = self._annotations(client, series, level_uids, workdir)
            found = annotated_rois(location, annotations, levels, rois)  # type: ignore[arg-type]
            try:
                with warnings.catch_warnings():
                    # wsidicom reads the levels' JSON without fetching bulk data (the ICC
                    # profile); pydicom warns about each, though nothing here needs them
                    warnings.filterwarnings("ignore", "No bulk data URI handler", UserWarning)
                    wsi = WsiDicom.open_web(
                        WsiDicomWebClient(client),
                        self.study,
                        series_uid,
                        requested_transfer_syntax=JPEG_BASELINE,
                    )
            except SlideError:
                raise
            except Exception as exc:
                raise SlideError(f"slide {location}: wsidicom cannot open it: {exc}") from exc
            transfer = wsi.levels[0].default_instance.image_data.transfer_syntax
            # frames go as they are only when they arrive as baseline JPEG (reader: frame_fields)
            base.file_meta.TransferSyntaxUID = (
                JPEG_BASELINE if str(transfer) == JPEG_BASELINE else EXPLICIT_VR_LITTLE_ENDIAN
            )
            source = _web_source_class()(location, wsi, levels, base, annotations, found, workdir)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        if not found:
            use_automatic_rois(source)  # closes the source when it finds none
        return source

    def store(self, path: Path) -> str:
        """STOW-RS one written object into the slide's study; returns its WADO-RS URL."""
        import pydicom

        ds = pydicom.dcmread(path)
        if str(ds.StudyInstanceUID) != self.study:
            raise SlideError(f"{path}: belongs to study {ds.StudyInstanceUID}, not {self.study}")
        client = self.endpoint.client()
        answer = self.endpoint.call(
            f"storing {Path(path).name}", lambda: client.store_instances([ds], self.study)
        )
        failed = getattr(answer, "FailedSOPSequence", None)
        if failed:
            reason = getattr(failed[0], "FailureReason", "?")
            raise SlideError(f"DICOMweb {self.endpoint.root}: refused {path} (reason {reason})")
        # Our own URL rather than the answer's RetrieveURL: archives behind a proxy (and
        # Orthanc 1.10, without the port) answer with an address the client may not reach.
        return (
            f"{self.endpoint.root}/studies/{self.study}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )


@cache
def _web_source_class() -> type[SlideSource]:
    """``SlideSource`` for an archived slide: pixels over DICOMweb, annotation objects in a
    private folder removed on ``close``. Made on first use so that this module (and the
    command line's options) import without the DICOM libraries."""
    from marrowdx.slides.reader import SlideSource

    class WebSlideSource(SlideSource):
        def __init__(self, location, wsi, levels, base, annotations, rois, workdir: Path):
            super().__init__(location, wsi, levels, base, annotations, rois)
            self._workdir = workdir

        def close(self) -> None:
            super().close()
            shutil.rmtree(self._workdir, ignore_errors=True)

    return WebSlideSource


def endpoint_from_options(
    url: str, token_file: Path | None, ca_file: Path | None, env: dict[str, str] | Any = None
) -> DicomWebEndpoint:
    """The endpoint of the command line: the token from ``token_file``, else $TOKEN_ENV."""
    import os

    env = os.environ if env is None else env
    token = None
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SlideError(f"bearer token file {token_file}: {exc}") from exc
    elif env.get(TOKEN_ENV):
        token = env[TOKEN_ENV]
    return DicomWebEndpoint(url, token=token, ca_file=ca_file)
