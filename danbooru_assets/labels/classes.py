"""The label classes, in a module of their own: settings and the code location check
class names without loading the store (numpy, pandas)."""

LABEL_CLASSES: tuple[str, ...] = ("good", "questionable", "bad")
