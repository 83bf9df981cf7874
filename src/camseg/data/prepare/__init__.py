"""Converters from public medical datasets to the camseg folder format.

Each converter is a function (``convert_ct_ich``, ``convert_lidc``, ``convert_folder``,
``convert_lgg_mri``) and a ``camseg-data`` subcommand added by :func:`register`. All of
them build the result in a hidden sibling folder, validate it with
:func:`camseg.data.folder.validate_root`, and rename it onto ``--out`` at the end.
"""

from __future__ import annotations

import argparse

from camseg.data.prepare import ctich, folder_per_class, lgg_mri, lidc
from camseg.data.prepare.ctich import convert_ct_ich
from camseg.data.prepare.folder_per_class import convert_folder
from camseg.data.prepare.lgg_mri import convert_lgg_mri
from camseg.data.prepare.lidc import convert_lidc
from camseg.data.prepare.lidc_annotations import LidcScanRecord, LidcSource
from camseg.data.prepare.windowing import WINDOW_PRESETS, CtWindow, apply_windows, parse_windows

__all__ = [
    "WINDOW_PRESETS",
    "CtWindow",
    "LidcScanRecord",
    "LidcSource",
    "apply_windows",
    "convert_ct_ich",
    "convert_folder",
    "convert_lgg_mri",
    "convert_lidc",
    "parse_windows",
    "register",
]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the subcommands ct-ich, lidc, folder, lgg-mri; each sets ``func=<callable(args) -> int>``."""
    ctich.add_parser(subparsers)
    lidc.add_parser(subparsers)
    folder_per_class.add_parser(subparsers)
    lgg_mri.add_parser(subparsers)
