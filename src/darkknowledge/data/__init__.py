"""Embedded data sets, so that the demo and the tests need no network.

``digits``: scikit-learn's copy of the UCI optical handwritten digits (1797 images of 8x8
pixels with values 0..16, 10 classes), stored here as ``digits.npz`` (uint8, 45 kB).

>>> from darkknowledge.data import load_digits
>>> images, labels = load_digits()
>>> tuple(images.shape), tuple(labels.shape), int(labels.max()) + 1
((1797, 64), (1797,), 10)
"""

from .digits import load_digits, split_digits, stratified_split

__all__ = ["load_digits", "split_digits", "stratified_split"]
