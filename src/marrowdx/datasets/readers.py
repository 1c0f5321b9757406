"""Readers for the layouts public sets and lab annotation tools write, and layout detection.

Each reader returns the data as found (:class:`RawCrop`, :class:`RawField`: source labels,
boxes in the image's own pixels as x0, y0, x1, y1); mapping labels onto the taxonomy is
``load_dataset``'s job, so every reader treats labels alike. A file that cannot be read is
an error naming the file (and line), never skipped: a dropped image would silently change
what a model learns or what a count is compared with.
"""

from __future__ import annotations

import itertools
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from marrowdx.datasets.base import (
    DatasetError,
    RawCrop,
    RawField,
    as_boxes,
    checked_box,
    image_size,
    images_under,
    is_image,
    split_of,
    visible_children,
)

#: What each layout looks like, for the error on a folder that matches none. "Side by side"
#: is how annotation tools export: Roboflow writes each split's images with their XML or its
#: _annotations.coco.json in ROOT/<split>/, LabelImg saves the XML or the YOLO txt (and
#: classes.txt) beside each image.
LAYOUTS: dict[str, str] = {
    "crops": "ROOT/<CLASS>/*.jpg|png|tif|bmp or ROOT/<split>/<CLASS>/... (one folder per class)",
    "yolo": "ROOT/images/[<split>/]*.jpg + ROOT/labels/[<split>/]*.txt ('cls cx cy w h', "
    "normalised) with classes.txt or data.yaml; or ROOT/<split>/images + ROOT/<split>/labels; "
    "or each X.txt beside X.jpg in ROOT or ROOT/<split>/, with classes.txt or data.yaml",
    "voc": "ROOT/Annotations/*.xml + ROOT/JPEGImages/ or ROOT/images/ (Pascal VOC); or each "
    "X.xml beside X.jpg in ROOT or ROOT/<split>/",
    "coco": "ROOT/annotations/*.json (COCO detection, bbox x,y,w,h), or a COCO JSON beside the "
    "images in ROOT or ROOT/<split>/ (named *coco*, *instances* or *annotation*, as "
    "_annotations.coco.json), or the JSON file itself",
}
#: Words of which a COCO export's JSON file name holds one (instances_train.json,
#: _annotations.coco.json, annotations.json): how a COCO file beside images is told from
#: other JSON without reading it (such files can be hundreds of megabytes).
COCO_NAME_WORDS: tuple[str, ...] = ("coco", "instances", "annotation")
#: Files that name YOLO classes, in the order they are looked for (the first found wins).
YOLO_NAME_FILES: tuple[str, ...] = ("data.yaml", "dataset.yaml", "classes.txt")


# ----------------------------------------------------------------------------- detection
def _child_dir(root: Path, name: str) -> Path | None:
    """A sub-folder by name, matched case-insensitively (VOC's "Annotations" vs COCO's
    "annotations" is a convention, not a guarantee)."""
    for p in visible_children(root):
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return None


def _yolo_roots(root: Path) -> list[tuple[Path, Path, str | None]]:
    """(images folder, labels folder, split) pairs of a YOLO layout, or [] if it is none."""
    images, labels = _child_dir(root, "images"), _child_dir(root, "labels")
    if images is not None and labels is not None:
        return [(images, labels, None)]
    pairs = []
    for sub, split in _split_folders(root):
        images, labels = _child_dir(sub, "images"), _child_dir(sub, "labels")
        if images is not None and labels is not None:
            pairs.append((images, labels, split))
    return pairs


def _split_folders(root: Path) -> list[tuple[Path, str]]:
    """ROOT's sub-folders named as a split (train/, valid/, TestA/), with the split."""
    return [
        (p, split)
        for p in visible_children(root)
        if p.is_dir() and (split := split_of(p.name)) is not None
    ]


def _export_folders(root: Path) -> list[tuple[Path, str | None]]:
    """The folders an export puts its files side by side in, with their split: ROOT's split
    sub-folders (train/, valid/, test/) when it has any, else ROOT itself (its split from its
    own name, so a split folder can be given alone)."""
    splits: list[tuple[Path, str | None]] = list(_split_folders(root))
    if not splits:
        return [(root, split_of(root.name))]
    loose = [p.name for p in visible_children(root) if is_image(p)]
    if loose:  # read with the splits, they would belong to none; left out, they would be lost
        raise DatasetError(
            f"{root} holds split folders ({', '.join(p.name for p, _ in splits)}) and "
            f"{len(loose)} image(s) beside them ({', '.join(loose[:3])}"
            f"{' ...' if len(loose) > 3 else ''}): move each image into its split's folder"
        )
    return splits


def _files_beside_images(folder: Path, suffix: str) -> list[Path]:
    """Files of ``suffix`` that sit in ``folder`` beside at least one image, else []."""
    entries = visible_children(folder)
    if not any(is_image(p) for p in entries):
        return []
    return [p for p in entries if p.is_file() and p.suffix.lower() == suffix]


def _is_coco_name(path: Path) -> bool:
    return path.suffix.lower() == ".json" and any(w in path.name.lower() for w in COCO_NAME_WORDS)


def _coco_beside(root: Path) -> list[Path]:
    """COCO JSON files exported beside their images (Roboflow's
    ROOT/<split>/_annotations.coco.json)."""
    return [
        p
        for folder, _ in _export_folders(root)
        for p in _files_beside_images(folder, ".json")
        if _is_coco_name(p)
    ]


def _voc_beside(root: Path) -> list[tuple[Path, str | None]]:
    """(folder, split) of VOC XML files saved beside their images (Roboflow, LabelImg)."""
    return [(f, s) for f, s in _export_folders(root) if _files_beside_images(f, ".xml")]


def _yolo_beside(root: Path) -> list[tuple[Path, Path, str | None]]:
    """(folder, folder, split) of YOLO txt files saved beside their images (LabelImg), only
    with a class-names file in ROOT or the folder: without one, a .txt beside an image is
    as likely a note as a label file."""
    pairs = []
    for folder, split in _export_folders(root):
        texts = [p for p in _files_beside_images(folder, ".txt") if p.name not in YOLO_NAME_FILES]
        named = any((d / n).is_file() for d in (root, folder) for n in YOLO_NAME_FILES)
        if texts and named:
            pairs.append((folder, folder, split))
    return pairs


def _crop_classes(root: Path) -> list[tuple[Path, str | None]] | None:
    """(class folder, split) of a folder-per-class layout, or None if ``root`` is not one."""
    subs = [p for p in visible_children(root) if p.is_dir()]
    if not subs or any(is_image(p) for p in visible_children(root)):
        return None
    splits = _split_folders(root)
    if len(splits) == len(subs):
        classes = [(c, split) for s, split in splits for c in visible_children(s) if c.is_dir()]
    elif splits and all(any(c.is_dir() for c in visible_children(s)) for s, _ in splits):
        # split folders of class folders beside other folders (Kaggle's TRAIN/, TEST/ and
        # TEST_SIMPLE/): read as classes, every label would be a split's name
        others = [p.name for p in subs if split_of(p.name) is None]
        names = ", ".join(s.name for s, _ in splits)
        raise DatasetError(
            f"{root}: split folders of class folders ({names}) beside folders that "
            f"are no split ({', '.join(others[:5])}): give one split's folder as the data set, "
            f"or move the others out"
        )
    else:
        classes = [(c, None) for c in subs]
    if not classes or not any(images_under(c) for c, _ in classes):
        return None
    return classes


def detect_format(root: Path) -> str:
    """The layout of ``root`` (one of ``FORMATS``), or a DatasetError that names what was
    found and the layouts accepted."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() == ".json":
            return "coco"
        raise DatasetError(f"{root} is a file; a data set is a folder, or a COCO .json file")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    annotations = _child_dir(root, "annotations")
    if annotations is not None:
        if any(p.suffix.lower() == ".xml" for p in annotations.iterdir()):
            return "voc"
        if any(p.suffix.lower() == ".json" for p in annotations.iterdir()):
            return "coco"
    if _yolo_roots(root):
        return "yolo"
    if _coco_beside(root):
        return "coco"
    if _voc_beside(root):
        return "voc"
    if _yolo_beside(root):
        return "yolo"
    if _crop_classes(root) is not None:
        return "crops"
    found = visible_children(root)
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found[:12])
    more = f" and {len(found) - 12} more" if len(found) > 12 else ""
    accepted = "\n".join(f"  {name}: {text}" for name, text in LAYOUTS.items())
    raise DatasetError(
        f"{root}: not a data set layout marrowdx reads (found: {shown or 'nothing'}{more}).\n"
        f"Accepted layouts:\n{accepted}"
    )


# ----------------------------------------------------------------------------- crops
def read_crops(root: Path, *, verify: bool = False) -> list[RawCrop]:
    """Folder-per-class single-cell crops (Munich bone marrow, PBC, Raabin-WBC,
    AML-Cytomorphology): the folder name is the label; images at any depth below it."""
    classes = _crop_classes(Path(root))
    if classes is None:
        raise DatasetError(f"{root}: not a folder-per-class layout ({LAYOUTS['crops']})")
    crops = []
    for folder, split in classes:
        for path in images_under(folder):
            image_size(path, verify=verify)
            crops.append(RawCrop(path, folder.name, split))
    return crops


# ----------------------------------------------------------------------------- YOLO
def _yolo_yaml_names(path: Path) -> list[str]:
    import yaml  # PyYAML: data.yaml files carry comments, flow lists, quoted names, scripts

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML ({exc})") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list) and all(isinstance(n, str | int) for n in names):
        return [str(n) for n in names]
    if isinstance(names, dict) and all(isinstance(k, int) for k in names):
        if sorted(names) != list(range(len(names))):
            raise DatasetError(f"{path}: 'names' keys must be 0..{len(names) - 1}")
        return [str(names[i]) for i in range(len(names))]
    raise DatasetError(f"{path}: no 'names:' list or {{index: name}} mapping")


def _read_names(path: Path) -> list[str]:
    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        return lines
    return _yolo_yaml_names(path)


def yolo_class_names(root: Path, label_roots: list[Path]) -> list[str] | None:
    """Class names from the first of data.yaml, dataset.yaml, classes.txt found in ROOT, then
    in the labels folder(s), then in the per-split labels folders below them (which must
    agree: a more general file wins over them); None when there is none (the labels are then
    the class indices as text)."""
    for folder in (root, *label_roots):
        for name in YOLO_NAME_FILES:
            if (folder / name).is_file():
                return _read_names(folder / name)
    split_dirs = [p for r in label_roots for p in visible_children(r) if p.is_dir()]
    for name in YOLO_NAME_FILES:
        found = [(d / name, _read_names(d / name)) for d in split_dirs if (d / name).is_file()]
        for path, names in found[1:]:
            if names != found[0][1]:
                raise DatasetError(
                    f"{found[0][0]} and {path} name different classes; put one {name} in {root}"
                )
        if found:
            return found[0][1]
    return None


def _yolo_line(
    text: str, where: str, names: list[str] | None, width: int, height: int
) -> tuple[str, tuple[float, float, float, float]]:
    parts = text.split()
    try:
        cls_value = float(parts[0])
        values = [float(v) for v in parts[1:]]
    except ValueError:
        raise DatasetError(f"{where}: not numbers: {text.strip()!r}") from None
    if cls_value != int(cls_value) or cls_value < 0:
        raise DatasetError(f"{where}: class {parts[0]!r} is not a class index")
    cls = int(cls_value)
    if len(values) == 4:
        cx, cy, w, h = values
        if w <= 0 or h <= 0:
            raise DatasetError(f"{where}: box width/height must be positive: {text.strip()!r}")
        box = (
            (cx - w / 2) * width,
            (cy - h / 2) * height,
            (cx + w / 2) * width,
            (cy + h / 2) * height,
        )
    elif len(values) >= 6 and len(values) % 2 == 0:  # YOLO segmentation: a polygon
        xs, ys = values[0::2], values[1::2]
        box = (min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height)
    else:
        raise DatasetError(
            f"{where}: expected 'class cx cy w h' (normalised) or a polygon "
            f"'class x1 y1 x2 y2 ...', got {len(parts)} values: {text.strip()!r}"
        )
    if names is not None and cls >= len(names):
        raise DatasetError(f"{where}: class {cls}, but only {len(names)} class names are given")
    label = names[cls] if names is not None else str(cls)
    return label, checked_box(box, width, height, where)


def read_yolo(root: Path, *, verify: bool = False) -> list[RawField]:
    """YOLO txt boxes: ``labels/<...>/X.txt`` beside ``images/<...>/X.jpg`` (the images
    path with ``images`` replaced by ``labels``), or ``X.txt`` in the image's own folder (a
    LabelImg export), one ``class cx cy w h`` line per box,
    normalised to the image. An image with no label file has no boxes (YOLO's convention);
    a label file with no image is an error (its annotations would be lost); beside the images,
    a text file that holds no YOLO rows is a note, not a label file."""
    root = Path(root)
    pairs = _yolo_roots(root) or _yolo_beside(root)
    if not pairs:
        raise DatasetError(f"{root}: not a YOLO layout ({LAYOUTS['yolo']})")
    names = yolo_class_names(root, [labels for _, labels, _ in pairs])
    fields = []
    for images, labels, pair_split in pairs:
        used: set[Path] = set()
        for path in images_under(images):
            rel = path.relative_to(images)
            split = pair_split if pair_split is not None else _first_split(rel)
            width, height = image_size(path, verify=verify)
            label_file = (labels / rel).with_suffix(".txt")
            rows, names_of = [], []
            if label_file.is_file():
                used.add(label_file)
                for n, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        label, box = _yolo_line(line, f"{label_file}:{n}", names, width, height)
                        names_of.append(label)
                        rows.append(box)
            fields.append(RawField(path, width, height, as_boxes(rows), names_of, split))
        orphans = [
            p
            for p in sorted(labels.rglob("*.txt"))
            if p not in used
            and p.name not in YOLO_NAME_FILES
            and (labels != images or _reads_as_yolo(p))
        ]
        if orphans:
            shown = ", ".join(str(p) for p in orphans[:5])
            raise DatasetError(
                f"{len(orphans)} YOLO label file(s) have no image in {images}: {shown}"
                + (" ..." if len(orphans) > 5 else "")
            )
    return fields


def _reads_as_yolo(path: Path, lines: int = 50) -> bool:
    """Whether a text file's first ``lines`` lines are YOLO rows (a class index, then at least
    four numbers). Beside the images, a text file that is none is a note (a README, Roboflow's
    README.roboflow.txt), not a label file whose image is missing."""
    try:
        with path.open(encoding="utf-8") as text:
            rows = [line.split() for line in itertools.islice(text, lines) if line.strip()]
        for row in rows:
            numbers = [float(v) for v in row]
            if len(numbers) < 5 or not numbers[0].is_integer():
                return False
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return True


def _first_split(rel: Path) -> str | None:
    return split_of(rel.parts[0]) if len(rel.parts) > 1 else None


# ----------------------------------------------------------------------------- Pascal VOC
def _xml_number(node: ET.Element, tag: str, where: str) -> float:
    text = node.findtext(tag)
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: <{tag}> is missing or not a number ({text!r})") from None


def _voc_splits(root: Path) -> dict[str, str]:
    """Image id -> split from ImageSets/Main/{train,val,test}.txt, when the set has them."""
    main = root / "ImageSets" / "Main"
    splits: dict[str, str] = {}
    for name in ("train", "val", "test"):
        path = main / f"{name}.txt"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").split():
                splits[line] = name
    return splits


def _voc_files(root: Path) -> list[tuple[Path, Path, str | None]]:
    """(XML file, folder of its image, split) of a VOC layout: ``Annotations/`` with the
    split from ``ImageSets/Main``, or XML files beside their images with the split from
    their folder."""
    annotations = _child_dir(root, "annotations")
    if annotations is not None:
        xml_files = sorted(annotations.glob("*.xml"))
        if not xml_files:
            raise DatasetError(f"{annotations}: no .xml annotation files")
        # VOC's own name, else the images/ folder some published VOC sets use instead
        images_dir = _child_dir(root, "JPEGImages") or _child_dir(root, "images") or root
        splits = _voc_splits(root)
        return [(x, images_dir, splits.get(x.stem)) for x in xml_files]
    return [
        (x, folder, split)
        for folder, split in _voc_beside(root)
        for x in _files_beside_images(folder, ".xml")
    ]


def read_voc(root: Path, *, verify: bool = False) -> list[RawField]:
    """Pascal VOC XML, one file per image in ``Annotations/`` with the images in
    ``JPEGImages/``, or beside each image (Roboflow, LabelImg). VOC coordinates are 1-based
    pixel indices of the first and last pixel inside the box: x0 = xmin - 1, x1 = xmax."""
    root = Path(root)
    files = _voc_files(root)
    if not files:
        raise DatasetError(f"{root}: not a VOC layout ({LAYOUTS['voc']})")
    fields = []
    for xml_path, images_dir, split in files:
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as exc:
            raise DatasetError(f"{xml_path}: not valid XML ({exc})") from None
        filename = (tree.findtext("filename") or "").strip()
        path = _voc_image(images_dir, filename, xml_path)
        width, height = image_size(path, verify=verify)
        size = tree.find("size")
        if size is not None:
            declared = (size.findtext("width"), size.findtext("height"))
            if all(declared) and float(declared[0] or 0) > 0:
                w, h = (int(float(v or 0)) for v in declared)
                if (w, h) != (width, height):
                    raise DatasetError(
                        f"{xml_path}: <size> says {w}x{h} but {path.name} is {width}x{height}"
                    )
        rows, labels = [], []
        for n, obj in enumerate(tree.findall("object"), 1):
            where = f"{xml_path}: object {n}"
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise DatasetError(f"{where} has no <name>")
            bnd = obj.find("bndbox")
            if bnd is None:
                raise DatasetError(f"{where} ({name}) has no <bndbox>")
            xmin, ymin, xmax, ymax = (
                _xml_number(bnd, t, where) for t in ("xmin", "ymin", "xmax", "ymax")
            )
            rows.append(checked_box((xmin - 1, ymin - 1, xmax, ymax), width, height, where))
            labels.append(name)
        fields.append(RawField(path, width, height, as_boxes(rows), labels, split))
    return fields


def _voc_image(images_dir: Path, filename: str, xml_path: Path) -> Path:
    candidates = [images_dir / filename] if filename else []
    candidates += [
        images_dir / f"{xml_path.stem}{s}" for s in (".jpg", ".jpeg", ".png", ".tif", ".bmp")
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetError(
        f"{xml_path}: its image {filename or xml_path.stem!r} is not in {images_dir}"
    )


# ----------------------------------------------------------------------------- COCO
def coco_files(root: Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    annotations = _child_dir(root, "annotations")
    files = sorted(annotations.glob("*.json")) if annotations is not None else []
    files = files or _coco_beside(root)
    if not files:
        raise DatasetError(f"{root}: no COCO JSON ({LAYOUTS['coco']})")
    return files


def _coco_split(path: Path) -> str | None:
    """The split a COCO file's name says (instances_val2017.json), else its folder's
    (Roboflow's valid/_annotations.coco.json)."""
    stem = path.stem.lower()
    for word, split in (("train", "train"), ("val", "val"), ("test", "test")):
        if word in stem:
            return split
    return split_of(path.parent.name)


def _coco_image(file_name: str, json_path: Path, root: Path, split: str | None) -> Path:
    bases = [json_path.parent, root, root / "images"]
    if split is not None:
        bases += [root / "images" / split, root / split]
    for base in dict.fromkeys(bases):
        if (base / file_name).is_file():
            return base / file_name
    tried = ", ".join(str(b) for b in dict.fromkeys(bases))
    raise DatasetError(f"{json_path}: image {file_name!r} not found (looked in {tried})")


def read_coco(root: Path, *, verify: bool = False) -> list[RawField]:
    """COCO detection JSON (``annotations/*.json``, a file beside the images in ROOT or
    ROOT/<split>/, or one given file): bbox is x, y, width, height in pixels; the category
    name is the label. The split comes from the file name (``instances_train.json``), else
    its folder's name; images are looked up beside the JSON, in ROOT, ROOT/images and
    ROOT/images/<split>."""
    root = Path(root)
    data_root = root
    if root.is_file():  # a JSON file given: the data set is its folder, or the one above
        data_root = root.parent.parent if root.parent.name.lower() == "annotations" else root.parent
    fields = []
    for json_path in coco_files(root):
        try:
            coco = json.loads(json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{json_path}: not valid JSON ({exc})") from None
        if not isinstance(coco, dict) or not all(
            k in coco for k in ("images", "annotations", "categories")
        ):
            raise DatasetError(
                f"{json_path}: not COCO detection JSON (needs images, annotations, categories)"
            )
        split = _coco_split(json_path)
        names = {c["id"]: str(c["name"]) for c in coco["categories"]}
        by_image: dict[object, list[dict]] = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann.get("image_id"), []).append(ann)
        known = {im.get("id") for im in coco["images"]}
        stray = [a.get("id") for i, anns in by_image.items() if i not in known for a in anns]
        if stray:
            raise DatasetError(f"{json_path}: annotations {stray[:5]} refer to no image")
        for image in coco["images"]:
            path = _coco_image(str(image["file_name"]), json_path, data_root, split)
            width, height = image_size(path, verify=verify)
            if (
                "width" in image
                and "height" in image
                and (image["width"], image["height"]) != (width, height)
            ):
                raise DatasetError(
                    f"{json_path}: image {image['file_name']!r} is declared "
                    f"{image['width']}x{image['height']} but is {width}x{height}"
                )
            rows, labels = [], []
            for ann in by_image.get(image["id"], []):
                where = f"{json_path}: annotation {ann.get('id')}"
                if ann.get("category_id") not in names:
                    raise DatasetError(
                        f"{where}: category_id {ann.get('category_id')!r} is not in categories"
                    )
                bbox = ann.get("bbox")
                if not isinstance(bbox, list) or len(bbox) != 4:
                    raise DatasetError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
                x, y, w, h = (float(v) for v in bbox)
                rows.append(checked_box((x, y, x + w, y + h), width, height, where))
                labels.append(names[ann["category_id"]])
            fields.append(RawField(path, width, height, as_boxes(rows), labels, split))
    return fields


READERS = {"yolo": read_yolo, "voc": read_voc, "coco": read_coco}
