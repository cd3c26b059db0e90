"""Deterministic synthetic datasets ("phantoms") in the real BraTS and Kaggle layouts.

Built on the MNI ICBM152 2009a brain that ships with nilearn, so tests, demos and smoke-training
runs have realistic data without downloading anything. Same seed, same bytes.

Example:
    >>> from brainscan.data.phantoms import write_brats_phantoms, write_kaggle_phantoms
    >>> cases = write_brats_phantoms("/tmp/brats", n=4)            # BraTS20_Training_001..004
    >>> training = write_kaggle_phantoms("/tmp/kaggle", n=40)      # /tmp/kaggle/Training
"""

from brainscan.data.phantoms.anatomy import MNI_TEMPLATE_NOTICE, load_template, template_dir
from brainscan.data.phantoms.brats import (
    DEFAULT_BRATS_SHAPE,
    BratsPhantom,
    brats_case_id,
    make_brats_phantom,
    write_brats_phantoms,
)
from brainscan.data.phantoms.kaggle import (
    KagglePhantomInfo,
    encode_jpeg,
    kaggle_file_name,
    make_kaggle_phantom,
    make_kaggle_phantom_with_info,
    write_kaggle_phantoms,
)

__all__ = [
    "DEFAULT_BRATS_SHAPE",
    "MNI_TEMPLATE_NOTICE",
    "BratsPhantom",
    "KagglePhantomInfo",
    "brats_case_id",
    "encode_jpeg",
    "kaggle_file_name",
    "load_template",
    "make_brats_phantom",
    "make_kaggle_phantom",
    "make_kaggle_phantom_with_info",
    "template_dir",
    "write_brats_phantoms",
    "write_kaggle_phantoms",
]
