"""The classifier kinds, in a module of their own: settings validate ``quality.classifier``
against them without loading scikit-learn."""

from typing import Literal, get_args

ClassifierKind = Literal["logreg", "mlp"]
CLASSIFIER_KINDS: tuple[str, ...] = get_args(ClassifierKind)
