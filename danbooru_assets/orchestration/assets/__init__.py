"""One module per stage: settings, index, clip, pose, quality."""
