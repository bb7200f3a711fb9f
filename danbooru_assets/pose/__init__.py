"""The pose library: keypoint import/export (``keypoint_files``), estimators
(``backends``), geometry rules and statistics (``geometry``) and drawing (``draw``).

Import from the submodules; this package imports nothing, so loading the code location
(which needs only ``pose.resource``) stays light.
"""
