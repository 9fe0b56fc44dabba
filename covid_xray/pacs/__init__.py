"""The PACS node: a DICOM listener that scores arriving chest X-ray studies with the
registered model and files its results in the PACS (docs/pacs.md).

Beside serving: it imports the model, tracking and imaging layers, never training or serving.
Needs the `pacs` extra (pynetdicom, dicomweb-client).
"""
