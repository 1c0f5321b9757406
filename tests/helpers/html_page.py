"""Reading the ``diagnose --html`` review page back: the numbers it shows, its images and
links, so tests can compare them with the JSON report (with or without a browser)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from html.parser import HTMLParser

from marrowdx.client.html_report import MISSING


class PageReader(HTMLParser):
    """Collects the summary table's ``data-field`` cells per patient, the lineage cells, the
    text of ``<pre id="image-check">`` and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.lineages: dict[str, dict[str, str]] = {}
        self.urls: list[str] = []
        self.image_sources: list[str] = []
        self.check = ""
        self._row: str | None = None
        self._target: tuple[dict[str, str], str] | None = None
        self._in_check = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "img":
            self.image_sources.append(a.get("src", ""))
        if tag == "tr" and "data-patient" in a:
            self._row = a["data-patient"]
            self.rows[self._row] = {}
        if tag == "td" and "data-field" in a and self._row is not None:
            self._target = (self.rows[self._row], a["data-field"])
        if tag == "td" and "data-lineage" in a:
            self._target = (self.lineages.setdefault(a["data-patient"], {}), a["data-lineage"])
        if tag == "pre" and a.get("id") == "image-check":
            self._in_check = True

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if tag == "td":
            self._target = None
        if tag == "pre":
            self._in_check = False

    def handle_data(self, data):
        if self._target is not None:
            store, key = self._target
            store[key] = store.get(key, "") + data
        if self._in_check:
            self.check += data


def read_page(text: str) -> PageReader:
    reader = PageReader()
    reader.feed(text)
    return reader


def shown_row(row: Mapping[str, str]) -> dict[str, object]:
    """The summary row's values as JSON values (``MISSING`` is null)."""
    return {
        k: None if v == MISSING else (v if k in TEXT_FIELDS else json.loads(v))
        for k, v in row.items()
    }


#: Summary cells that show text, not a JSON value.
TEXT_FIELDS = ("blast_call", "diagnosis")


def expected_row(patient: Mapping) -> dict[str, object]:
    """What the summary row must show for one patient of the JSON report."""
    d = patient["differential"]
    low, high = d["blast_percent_ci95"]
    diagnosis = patient["diagnosis"]
    return {
        "fields_used": patient["fields_used"],
        "nucleated_cells": d["nucleated_cells"],
        "blast_percent": d["blast_percent"],
        "blast_ci95_low": low,
        "blast_ci95_high": high,
        "blast_call": d["blast_call"],
        "me_ratio": d["me_ratio"],
        "unidentified": d["unidentified"],
        "unfamiliar": d["unfamiliar"],
        "diagnosis": diagnosis or "none",
        "probability": patient["probabilities"].get(diagnosis) if diagnosis else None,
        "refer_for_review": patient["refer_for_review"],
    }


def expected_lineages(patient: Mapping) -> dict[str, int]:
    d = patient["differential"]
    return {**d["lineages"], **d["not_in_differential"]}
