"""Caption sources (CSV/TSV, JSONL, folders, webdataset shards) read into CaptionRecord lists."""

from xclr_plugin.captions.csv_file import read_csv_captions
from xclr_plugin.captions.readers import (
    DEFAULT_SIDECAR,
    DEFAULT_TEMPLATE,
    FORMATS,
    check_template,
    detect_format,
    match_images,
    read_captions,
    read_class_captions,
    read_folder_captions,
    read_jsonl_captions,
)
from xclr_plugin.captions.records import CaptionRecord, path_key, validate_records

__all__ = [
    "DEFAULT_SIDECAR",
    "DEFAULT_TEMPLATE",
    "FORMATS",
    "CaptionRecord",
    "check_template",
    "detect_format",
    "match_images",
    "path_key",
    "read_captions",
    "read_class_captions",
    "read_csv_captions",
    "read_folder_captions",
    "read_jsonl_captions",
    "validate_records",
]
