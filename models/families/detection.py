"""The detection family: importing it registers every detector of the zoo.

- ``detection_base``: the shared ``DetectionRunner`` (checks, size grouping, post-processing).
- ``detection_torchvision``: fasterrcnn_resnet50_fpn_v2, retinanet_resnet50_fpn_v2,
  ssdlite320_mobilenet_v3_large (torchvision COCO weights).
- ``detection_tiny``: tiny_detector (seeded random, for tests and smoke deploys).
- ``detection_mtcnn``: mtcnn_faces (facenet-pytorch's shipped weights).
"""
from . import detection_mtcnn, detection_tiny, detection_torchvision  # noqa: F401
from .detection_base import DetectionRunner, RawDetections, check_detect_args  # noqa: F401
