"""Serving: registered models put to use.

Owns batch prediction on DICOM folders, evaluation of a model on labelled data (external
validation, never on what it learned from) and promotion on paired evidence. It imports every
layer below it; nothing imports it but the entry points.
"""
