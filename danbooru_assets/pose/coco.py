"""COCO-17 keypoint conventions shared by every pose-related module.

Names follow the seed's published JSON (``eye_left`` rather than COCO's ``left_eye``);
the order is COCO's. Coordinates everywhere in this project are image pixels of the
*original* image with x to the right and y down.
"""

from __future__ import annotations

KEYPOINT_NAMES: tuple[str, ...] = (
    "nose",
    "eye_left",
    "eye_right",
    "ear_left",
    "ear_right",
    "shoulder_left",
    "shoulder_right",
    "elbow_left",
    "elbow_right",
    "wrist_left",
    "wrist_right",
    "hip_left",
    "hip_right",
    "knee_left",
    "knee_right",
    "ankle_left",
    "ankle_right",
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)
KEYPOINT_INDEX = {name: i for i, name in enumerate(KEYPOINT_NAMES)}

# The standard COCO limb pairs (0-based indices into KEYPOINT_NAMES) with the colours
# the COCO / OpenPose visualisers use, so drawn skeletons look like everyone else's.
SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12),
    (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9), (8, 10),
    (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)
SKELETON_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0),
    (85, 255, 0), (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255),
    (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255), (170, 0, 255),
    (255, 0, 255), (255, 0, 170), (255, 0, 85), (128, 128, 128),
)

# Parquet column names for keypoints: kp_<name>_x, kp_<name>_y, kp_<name>_conf.
def keypoint_columns(name: str) -> tuple[str, str, str]:
    return (f"kp_{name}_x", f"kp_{name}_y", f"kp_{name}_conf")


KEYPOINT_COLUMNS: tuple[str, ...] = tuple(
    col for name in KEYPOINT_NAMES for col in keypoint_columns(name)
)
