"""The names of the pose backends, in a module of their own: the code location's
resource checks a configured name without loading the estimators (numpy, PIL, torch)."""

KEYPOINT_FILES = "keypoint_files"
BACKENDS: tuple[str, ...] = ("keypoint_rcnn", "bizarre_pose", "mediapipe", KEYPOINT_FILES)
