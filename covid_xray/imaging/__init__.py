"""Imaging: one DICOM file in, one preprocessed square out.

Owns reading DICOMs (every transfer syntax, LUTs, MONOCHROME1), the imagecodecs decoder
plugin, writing DICOMs (fixtures, demo data, the example request), the one preprocessing
shared by training and serving, the decoded-image cache, and the decoding worker processes.
It imports only the top-level modules (config, errors, lifecycle, files): the lowest layer.
"""
