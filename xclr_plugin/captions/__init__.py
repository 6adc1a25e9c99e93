"""Caption sources: where the description of each image comes from.

Every reader returns a list of :class:`CaptionRecord` ``(filename, caption, label)``
and names the file and line of the first problem: open_clip-style CSV/TSV
(:func:`read_csv_captions`), JSONL, an image folder with a sidecar CSV, a class folder
(:mod:`~xclr_plugin.captions.readers`) and webdataset shards
(:mod:`~xclr_plugin.captions.shards`, which needs webdataset and is imported lazily).
"""

from xclr_plugin.captions.csv_file import read_csv_captions
from xclr_plugin.captions.readers import (
    DEFAULT_SIDECAR,
    DEFAULT_TEMPLATE,
    FORMATS,
    check_template,
    detect_format,
    read_captions,
    read_class_captions,
    read_folder_captions,
    read_jsonl_captions,
)
from xclr_plugin.captions.records import CaptionRecord, validate_records

__all__ = [
    "DEFAULT_SIDECAR",
    "DEFAULT_TEMPLATE",
    "FORMATS",
    "CaptionRecord",
    "check_template",
    "detect_format",
    "read_captions",
    "read_class_captions",
    "read_csv_captions",
    "read_folder_captions",
    "read_jsonl_captions",
    "validate_records",
]
