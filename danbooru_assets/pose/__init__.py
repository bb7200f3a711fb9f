"""The pose library (no Dagster; the stage's assets are in ``orchestration/assets/pose.py``).

- ``coco``: the COCO-17 keypoint names, table columns and skeleton.
- ``keypoint_files``: import/export of published keypoint JSON files.
- ``backend_names``: the backends' names (light: the code location's resource checks them).
- ``backends``: the pose estimators behind one interface.
- ``features``: keypoint tables and arrays, per-pose features, robust statistics.
- ``density``: the midpoint density model the statistics learn and the rules test.
- ``rules``: the geometric filter (``apply_pose_rules``) and its drop reasons.
- ``plots``: feature pictures for the UI and the choice of contact-sheet examples.
- ``draw``: skeletons drawn on images.
- ``synthetic``: a canonical pose and random plausible poses (tests, benchmarks).

Import from the submodules; this package imports nothing, so loading a light one does
not pull numpy, pandas or torch.
"""
