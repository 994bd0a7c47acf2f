"""The serving graph's interface: what the calibration job exports into `model.onnx` and what
the service runs. One input batch of float32 images in [0, 1]; two float32 outputs, the logits
and the score (the score function lives in the graph itself, so job and service cannot
disagree about it)."""

from __future__ import annotations

from typing import Final

INPUT_NAME: Final = "input"
LOGITS: Final = "logits"
SCORE: Final = "score"
OUTPUTS: Final = (LOGITS, SCORE)
# ONNX Runtime's type strings for the input and both outputs.
TENSOR_TYPE: Final = "tensor(float)"
