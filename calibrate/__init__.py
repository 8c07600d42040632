"""Offline calibration: MMAC/MMOM activation bounds, the MMDF null, MM-BD, ONNX export.

Importing this package does not import torch; `calibrate.pipeline` does.
"""
