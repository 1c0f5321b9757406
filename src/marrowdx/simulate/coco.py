"""COCO detection JSON: write a simulated cohort as COCO, read a COCO dataset as ground truth.

Reading COCO lets the training code use a real dataset converted to COCO (boxes + category
names from taxonomy.CLASSES) exactly like a simulated cohort. Patient, diagnosis and attribute
information rides along in extra keys, which plain COCO tools ignore.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from marrowdx import taxonomy

#: COCO category ids are 1-based (0 is conventionally background).
CATEGORY_ID_OFFSET = 1


def to_coco(gt: dict) -> dict:
    """The ground truth as a COCO detection dict (bbox = [x, y, width, height])."""
    images, annotations = [], []
    for p in gt["patients"]:
        for im in p["images"]:
            image_id = len(images) + 1
            entry = {"id": image_id, "file_name": im["file"], "patient_id": p["patient_id"]}
            if "width" in im and "height" in im:
                entry.update(width=im["width"], height=im["height"])
            images.append(entry)
            for c in im["cells"]:
                x0, y0, x1, y1 = (float(v) for v in c["box"])
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": taxonomy.CLASS_INDEX[c["label"]] + CATEGORY_ID_OFFSET,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                        "attributes": dict(c.get("attributes") or {}),
                    }
                )
    return {
        "info": {"description": "marrowdx cohort", "attributes": gt.get("attributes")},
        "categories": [
            {"id": i + CATEGORY_ID_OFFSET, "name": n, "supercategory": "cell"}
            for i, n in enumerate(taxonomy.CLASSES)
        ],
        "images": images,
        "annotations": annotations,
        "patients": [
            {"patient_id": p["patient_id"], "diagnosis": p.get("diagnosis")} for p in gt["patients"]
        ],
    }


def write_coco(gt: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_coco(gt)) + "\n")
    return path


def _patient_of(image: dict, default: str) -> str:
    if image.get("patient_id"):
        return str(image["patient_id"])
    return Path(image["file_name"]).parent.name or default


def read_coco(coco_json: str | Path, images_dir: str | Path) -> dict:
    """Read COCO plus its image folder into the ground-truth schema.

    Images are grouped into patients by an image's ``patient_id`` key, else by the folder its
    ``file_name`` lies in (images directly in ``images_dir`` form one patient named after it).
    ``file`` paths stay relative to ``images_dir``. Categories must be
    named as in taxonomy.CLASSES; an unknown name or a missing image file is an error.
    """
    coco = json.loads(Path(coco_json).read_text())
    images_dir = Path(images_dir)
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise ValueError(f"{coco_json}: not COCO detection JSON (no {key!r})")
    names = {}
    for cat in coco["categories"]:
        if cat["name"] not in taxonomy.CLASS_INDEX:
            raise ValueError(
                f"{coco_json}: category {cat['name']!r} is not a marrowdx class "
                f"(map it to one of taxonomy.CLASSES first)"
            )
        names[cat["id"]] = cat["name"]
    diagnoses = {p["patient_id"]: p.get("diagnosis") for p in coco.get("patients", [])}
    by_image = defaultdict(list)
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    patients: dict[str, dict] = {}
    for image in coco["images"]:
        if not (images_dir / image["file_name"]).exists():
            raise FileNotFoundError(f"COCO image {image['file_name']!r} not in {images_dir}")
        pid = _patient_of(image, images_dir.resolve().name)
        patient = patients.setdefault(
            pid, {"patient_id": pid, "diagnosis": diagnoses.get(pid), "images": []}
        )
        cells = []
        for ann in by_image.get(image["id"], []):
            x, y, w, h = ann["bbox"]
            if ann["category_id"] not in names:
                raise ValueError(f"annotation {ann.get('id')} has unknown category_id")
            cells.append(
                {
                    "box": [x, y, x + w, y + h],
                    "label": names[ann["category_id"]],
                    "attributes": dict(ann.get("attributes") or {}),
                }
            )
        entry = {"file": image["file_name"], "cells": cells}
        if "width" in image and "height" in image:
            entry.update(width=image["width"], height=image["height"])
        patient["images"].append(entry)
    return {**taxonomy.as_metadata(), "patients": list(patients.values())}
