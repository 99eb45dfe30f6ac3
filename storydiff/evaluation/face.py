"""Face identity: dlib's face descriptors, compared between the frames of a character that show a face.

The models are the ones dlib ships through PyPI (``pip install dlib-bin face-recognition-models``, or the
``[face]`` extra): the HOG frontal face detector, the 5-point landmark model (enough to align a face for
the descriptor, and a tenth the size of the 68-point one) and the ResNet face recognition model, which
maps an aligned face to a 128-d descriptor. Similarity is the cosine of two descriptors, so it reads like
every other identity number of the report (1 = the same descriptor). dlib's own same-person rule is a
euclidean distance below 0.6; the descriptors are not unit length, so that threshold has no fixed cosine.

A frame where no face is found has no descriptor: a character's face similarity is over the pairs of its
frames with a face, and the report says how many of its frames had one. When a frame has several faces
the largest is used, for every character in the frame; a mask (``masks.py``) that keeps one character
makes the face its own.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..models.loading import ModelLoadError
from ..support.progress import Progress
from .encoders import ImageLike, _batched, _rgb

__all__ = ["FACE_INSTALL", "FaceEncoder", "face_model_dir", "load_face"]

FACE_INSTALL = "pip install dlib-bin face-recognition-models (or pip install 'storydiff-csa[face]')"
_SHAPE_MODEL = "shape_predictor_5_face_landmarks.dat"
_RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
DESCRIPTOR_SIZE = 128


def face_model_dir() -> Path:
    """The ``models/`` folder of the installed ``face_recognition_models``; ModelLoadError when absent.

    Found without importing the package: its ``__init__`` imports ``pkg_resources``, which new setuptools
    no longer has, and all that is needed is where its data files lie.
    """
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelLoadError(
            f"--face needs the face_recognition_models files, not installed here: {FACE_INSTALL}"
        )
    roots = list(spec.submodule_search_locations or []) or (
        [str(Path(spec.origin).parent)] if spec.origin else []
    )
    for root in roots:
        folder = Path(root) / "models"
        if (folder / _SHAPE_MODEL).is_file() and (folder / _RECOGNITION_MODEL).is_file():
            return folder
    raise ModelLoadError(
        f"--face: face_recognition_models is installed but lacks {_SHAPE_MODEL} or {_RECOGNITION_MODEL} "
        f"in {', '.join(roots) or 'its folder'}; reinstall it: {FACE_INSTALL}"
    )


class FaceEncoder:
    """Detector, 5-point landmarks and descriptor model together; ``encode_images`` gives one row per image,
    NaN where no face was found.

    ``upsample``: times the detector doubles the image first; 1 (face_recognition's default) finds faces
    down to about 40 pixels across, at four times the cost of 0 (about 80 pixels).
    """

    name = "face"

    def __init__(self, detector, shape_predictor, recognizer, *, source: str, upsample: int = 1) -> None:
        self.detector, self.shape_predictor, self.recognizer = detector, shape_predictor, recognizer
        self.source, self.upsample = source, upsample

    def describe(self, image: Image.Image) -> np.ndarray | None:
        """The (128,) descriptor of the largest face in ``image``, or None when none is found."""
        pixels = np.array(image.convert("RGB"), dtype=np.uint8)  # a contiguous copy, as dlib requires
        faces = list(self.detector(pixels, self.upsample))
        if not faces:
            return None
        face = max(faces, key=lambda box: box.width() * box.height())
        shape = self.shape_predictor(pixels, face)
        return np.asarray(self.recognizer.compute_face_descriptor(pixels, shape), dtype=np.float64)

    def encode_images(
        self, images: Sequence[ImageLike], *, batch_size: int = 16, progress: Progress = False
    ) -> torch.Tensor:
        """(N, 128) float32 descriptors, a row of NaN for an image without a detectable face."""

        def run(batch: Sequence[ImageLike]) -> torch.Tensor:
            rows = [self.describe(_rgb(image)) for image in batch]
            return torch.tensor(
                np.stack([np.full(DESCRIPTOR_SIZE, np.nan) if row is None else row for row in rows])
            )

        return _batched(run, images, batch_size, progress, "face images")


def load_face(*, upsample: int = 1) -> FaceEncoder:
    """dlib's HOG face detector, 5-point landmark model and ResNet face descriptor; ModelLoadError (one
    line, saying what to install) when dlib or the model files are missing."""
    try:
        import dlib
    except ImportError as exc:
        reason = "not installed here" if exc.name == "dlib" else f"cannot be imported ({exc})"
        raise ModelLoadError(f"--face needs dlib, {reason}: {FACE_INSTALL}") from None
    folder = face_model_dir()
    try:
        shape_predictor = dlib.shape_predictor(str(folder / _SHAPE_MODEL))
        recognizer = dlib.face_recognition_model_v1(str(folder / _RECOGNITION_MODEL))
    except RuntimeError as exc:  # dlib's error for an unreadable or truncated model file
        raise ModelLoadError(f"--face: cannot load dlib's face models from {folder} ({exc})") from None
    source = f"dlib {dlib.__version__}: HOG detector, {_SHAPE_MODEL}, {_RECOGNITION_MODEL}"
    return FaceEncoder(
        dlib.get_frontal_face_detector(), shape_predictor, recognizer, source=source, upsample=upsample
    )
