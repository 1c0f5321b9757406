// Shows ?study=UID&slide=SERIES with every ?ann=SERIES on top, and reports in window.result:
// status ("loading", "ready", "error"), frames loaded, loading errors. The test reads the
// drawn features from the OpenLayers map the viewer exposes (viewer.getMap()).
window.result = { status: "loading", framesLoaded: 0, errors: [] };

// Orthanc 1.10's DICOM JSON cuts float (OF) and long (OL) arrays to their first value: point
// the viewer at the archive's bulk data route for them instead (items counted from 1).
const BULK_TAGS = ["00660016", "00660040"]; // PointCoordinatesData, LongPrimitivePointIndexList

function useBulkData(metadata, root, study, series) {
  const sop = metadata["00080018"].Value[0];
  const base = `${root}/studies/${study}/series/${series}/instances/${sop}`;
  metadata["006A0002"].Value.forEach((group, i) => {
    for (const tag of BULK_TAGS) {
      if (tag in group) {
        group[tag] = {
          vr: group[tag].vr,
          BulkDataURI: `${base}/bulk/006a0002/${i + 1}/${tag.toLowerCase()}`,
        };
      }
    }
  });
  return metadata;
}

(async () => {
  try {
    const query = new URLSearchParams(window.location.search);
    const study = query.get("study");
    const root = `${window.location.origin}/dicom-web`;
    const dmv = window.dicomMicroscopyViewer;
    const client = new DICOMwebClient.api.DICOMwebClient({ url: root });
    const container = document.getElementById("viewer");
    container.addEventListener("dicommicroscopyviewer_frame_loading_ended", () => {
      window.result.framesLoaded += 1;
    });
    container.addEventListener("dicommicroscopyviewer_loading_error", (event) => {
      window.result.errors.push(String(event.detail && event.detail.payload));
    });
    const slide = await client.retrieveSeriesMetadata({
      studyInstanceUID: study,
      seriesInstanceUID: query.get("slide"),
    });
    const images = slide.map((m) => new dmv.metadata.VLWholeSlideMicroscopyImage({ metadata: m }));
    const viewer = new dmv.viewer.VolumeImageViewer({ client, metadata: images });
    viewer.render({ container });
    window.viewer = viewer;
    for (const series of query.getAll("ann")) {
      const found = await client.retrieveSeriesMetadata({
        studyInstanceUID: study,
        seriesInstanceUID: series,
      });
      for (const item of found) {
        const annotations = new dmv.metadata.MicroscopyBulkSimpleAnnotations({
          metadata: useBulkData(item, root, study, series),
        });
        viewer.addAnnotationGroups(annotations);
        for (const group of annotations.AnnotationGroupSequence) {
          viewer.showAnnotationGroup(group.AnnotationGroupUID);
        }
      }
    }
    window.result.status = "ready";
  } catch (error) {
    window.result.status = "error";
    window.result.errors.push(String((error && error.stack) || error));
  }
})();
