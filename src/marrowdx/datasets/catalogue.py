"""The public data sets the project names: sources, licences, counts, and label maps.

One table, read by ``marrowdx data list`` (what to get and where), ``marrowdx data declare``
(the declaration file to put beside a downloaded copy) and the model card. Counts and
classes are those of the public release; a copy may hold a subset. Pixel spacing is
"unknown" where the source does not state it (the product estimates it from red cells).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from marrowdx.datasets.declaration import UNKNOWN, declaration_text


@dataclass(frozen=True)
class PublicSet:
    """One public data set: where it comes from and how its labels map onto the taxonomy."""

    key: str
    title: str
    citation: str
    doi_or_url: str
    license: str
    kind: str  # "bone-marrow single-cell crops", "peripheral-blood fields with boxes", ...
    count: str
    format: str
    where: str  # how to get it
    #: source label -> (target as declared, what the source's code means)
    labels: dict[str, tuple[str | list[str], str]]
    um_per_pixel: float | str = UNKNOWN
    held_out_splits: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: Labels in ``labels`` that are other copies' names for a class, not classes of their own.
    aliases: tuple[str, ...] = ()

    @property
    def classes(self) -> list[str]:
        return [k for k in self.labels if k not in self.aliases]

    def declaration(self) -> str:
        """The declaration file for a downloaded copy (``marrowdx data declare``)."""
        header = [
            f"{self.title}",
            f"{self.citation}",
            f"{self.doi_or_url} ({self.license})",
            "Written by `marrowdx data declare`; edit the label map to suit your copy.",
            "Targets: a class, a group (blasts, nucleated, eosinophils, ...), a list of them,",
            "'ignore' (no class is learnt) or 'red_cell' (not counted; gives the pixel spacing).",
            *self.notes,
        ]
        values: dict[str, object] = {
            "name": self.key,
            "format": self.format,
            "um_per_pixel": self.um_per_pixel,
            "source": self.citation,
            "license": self.license,
            "url": self.doi_or_url,
        }
        if self.held_out_splits:
            values["held_out_splits"] = list(self.held_out_splits)
        return declaration_text(
            header=header,
            values=values,
            labels={k: t for k, (t, _) in self.labels.items()},
            label_comments={k: meaning for k, (_, meaning) in self.labels.items()},
        )


# fmt: off
PUBLIC_SETS: dict[str, PublicSet] = {s.key: s for s in (
    PublicSet(
        key="matek_bm_crops",
        title="Bone-Marrow-Cytomorphology_MLL_Helmholtz_Fraunhofer (Munich bone-marrow crops)",
        citation="Matek C, Krappe S, Münzenmayer C, Haferlach T, Marr C. Highly accurate "
        "differentiation of bone marrow cell morphologies using deep neural networks on a "
        "large image data set. Blood 2021;138(20):1917-1927",
        doi_or_url="https://doi.org/10.7937/TCIA.AXH3-T579",
        license="CC BY 4.0",
        kind="bone-marrow single-cell crops, 250x250 px, May-Grünwald-Giemsa/Pappenheim, 40x oil",
        count="171,374 crops from 945 patients, 21 classes",
        format="crops",
        where="The Cancer Imaging Archive (TCIA), collection "
        "Bone-Marrow-Cytomorphology_MLL_Helmholtz_Fraunhofer (IBM Aspera download); unpack so "
        "that each class code is a folder (its numbered sub-folders may stay)",
        # so that its white cells measure what the same types measure in the blood sets
        # (segmented neutrophils about 110 px, 11 µm; docs/real_cells.md); 0.09, from its
        # red cells, drew them 10-20% smaller than the blood sets' own
        um_per_pixel=0.10,
        labels={
            "ABE": ("eosinophils", "abnormal eosinophil"),
            "ART": ("artifact", "artefact"),
            "BAS": ("basophils", "basophil"),
            "BLA": ("blasts", "blast"),
            "EBO": ("erythroblasts", "erythroblast"),
            "EOS": ("eosinophils", "eosinophil"),
            "FGC": ("ignore", "faggot cell (no class of its own)"),
            "HAC": ("ignore", "hairy cell (no class of its own)"),
            "KSC": ("smudge_cell", "smudge cell"),
            "LYI": (["lymphoid_precursor_cell", "lymphocytic_blast", "prolymphocyte"],
                    "immature lymphocyte"),
            "LYT": ("lymphocyte", "lymphocyte"),
            "MMZ": ("neutrophilic_metamyelocyte", "metamyelocyte"),
            "MON": ("monocyte", "monocyte"),
            "MYB": ("neutrophilic_myelocyte", "myelocyte"),
            "NGB": ("neutrophilic_band", "band neutrophil"),
            "NGS": ("segmented_neutrophil", "segmented neutrophil"),
            "NIF": ("not_identifiable", "not identifiable"),
            "OTH": ("ignore", "other cell"),
            "PEB": ("proerythroblast", "proerythroblast"),
            "PLM": ("plasma_cell", "plasma cell"),
            "PMO": ("promyelocyte", "promyelocyte"),
        },
    ),
    PublicSet(
        key="txl_pbc",
        title="TXL-PBC: peripheral-blood fields with white cell, red cell and platelet boxes",
        citation="Gan L, Li X, Wang X. TXL-PBC: a freely accessible labeled peripheral blood "
        "cell dataset. arXiv 2407.13214 (2024)",
        doi_or_url="https://arxiv.org/abs/2407.13214 ; https://github.com/lugan113/TXL-PBC_Dataset",
        license="MIT",
        kind="peripheral-blood fields (BCCD 640x480, BCD 416x416, PBC 360x363, Raabin-WBC "
        "575x575) re-annotated with YOLO boxes",
        count="1,440 images (train 1,008, val 288, test 144)",
        format="yolo",
        where="git clone https://github.com/lugan113/TXL-PBC_Dataset; the data set is its "
        "TXL_PBC/ folder (data.yaml, images/ and labels/ with train, val and test splits)",
        labels={
            "WBC": ("nucleated", "white blood cell"),
            "RBC": ("red_cell", "red blood cell"),
            "Platelet": ("thrombocyte", "platelet"),
            "Platelets": ("thrombocyte", "platelet (name in some copies)"),
            "PC": ("thrombocyte", "platelet (name in the per-split classes.txt)"),
        },
        held_out_splits=("test",),
        aliases=("Platelets", "PC"),
        notes=("Its test split is held out: never train or tune on it.",),
    ),
    PublicSet(
        key="pbc",
        title="PBC: a dataset of microscopic peripheral blood cell images (Barcelona)",
        citation="Acevedo A, Merino A, Alférez S, Molina Á, Boldú L, Rodellar J. A dataset of "
        "microscopic peripheral blood cell images for development of automatic recognition "
        "systems. Data in Brief 2020;30:105474",
        doi_or_url="https://doi.org/10.17632/snkd93bnjr.1",
        license="CC BY 4.0",
        kind="peripheral-blood single-cell crops, 360x363 px, CellaVision DM96, "
        "May-Grünwald-Giemsa",
        count="17,092 crops, 8 classes",
        format="crops",
        where="Mendeley Data (the DOI above): PBC_dataset_normal_DIB.zip, one folder per class",
        labels={
            "basophil": ("basophils", "basophil"),
            "eosinophil": ("eosinophils", "eosinophil"),
            "erythroblast": ("erythroblasts", "erythroblast"),
            "ig": ("immature_granulocytes", "immature granulocyte (pro-, meta-, myelocyte)"),
            "lymphocyte": ("lymphocyte", "lymphocyte"),
            "monocyte": ("monocyte", "monocyte"),
            "neutrophil": ("neutrophils_mature", "neutrophil (band or segmented)"),
            "platelet": ("thrombocyte", "platelet"),
        },
        notes=("Some PBC images are also TXL-PBC fields: never train on one, test on the other.",),
    ),
    PublicSet(
        key="raabin_wbc",
        title="Raabin-WBC: a large free-access dataset of white blood cells",
        citation="Kouzehkanan ZM, Saghari S, Tavakoli S, et al. A large dataset of white blood "
        "cells containing cell locations and types, along with segmented nuclei and "
        "cytoplasm. Scientific Reports 2022;12:1123",
        doi_or_url="https://doi.org/10.1038/s41598-021-04426-x ; https://raabindata.com/free-data/",
        license="free access for research; see the terms on raabindata.com",
        kind="peripheral-blood single-cell crops, two microscopes and two cameras",
        count="about 40,000 images; the double-labelled crops come in Train, TestA and TestB",
        format="crops",
        where="raabindata.com, 'Free data' (Raabin-WBC cropped double-labelled cells)",
        labels={
            "Basophil": ("basophils", "basophil"),
            "Eosinophil": ("eosinophils", "eosinophil"),
            "Lymphocyte": ("lymphocyte", "lymphocyte"),
            "Monocyte": ("monocyte", "monocyte"),
            "Neutrophil": ("neutrophils_mature", "neutrophil (band or segmented)"),
        },
        notes=("Some Raabin-WBC images are also TXL-PBC fields: keep splits apart.",),
    ),
    PublicSet(
        key="aml_cytomorphology_lmu",
        title="AML-Cytomorphology_LMU: peripheral-blood single cells of AML patients and controls",
        citation="Matek C, Schwarz S, Spiekermann K, Marr C. Human-level recognition of blast "
        "cells in acute myeloid leukaemia with convolutional neural networks. Nature Machine "
        "Intelligence 2019;1:538-544",
        doi_or_url="https://doi.org/10.7937/tcia.2019.36f5o9ld",
        license="see the TCIA collection page (TCIA data usage policy; citation required)",
        kind="peripheral-blood single-cell crops (TIFF), M8 scanner at 100x oil, 100 AML patients "
        "and 100 controls",
        count="18,365 crops, 15 classes",
        format="crops",
        where="The Cancer Imaging Archive (TCIA), collection AML-Cytomorphology_LMU",
        labels={
            "BAS": ("basophils", "basophil"),
            "EBO": ("erythroblasts", "erythroblast"),
            "EOS": ("eosinophils", "eosinophil"),
            "KSC": ("smudge_cell", "smudge cell"),
            "LYA": ("reactive_lymphocyte", "atypical lymphocyte"),
            "LYT": ("lymphocyte", "typical lymphocyte"),
            "MMZ": ("neutrophilic_metamyelocyte", "metamyelocyte"),
            "MOB": ("monocytic_blast", "monoblast"),
            "MON": ("monocyte", "monocyte"),
            "MYB": ("neutrophilic_myelocyte", "myelocyte"),
            "MYO": ("myelocytic_blast", "myeloblast"),
            "NGB": ("neutrophilic_band", "band neutrophil"),
            "NGS": ("segmented_neutrophil", "segmented neutrophil"),
            "PMB": ("promyelocyte", "bilobed (atypical) promyelocyte"),
            "PMO": ("promyelocyte", "promyelocyte"),
        },
    ),
)}
# fmt: on


def public_set(key: str) -> PublicSet:
    from marrowdx.datasets.base import DatasetError

    if key not in PUBLIC_SETS:
        raise DatasetError(f"unknown data set {key!r}; known: {', '.join(PUBLIC_SETS)}")
    return PUBLIC_SETS[key]
