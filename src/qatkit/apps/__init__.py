"""Applications: what runs the qatkit core end to end on one model family and dataset.

The demo detector (``models/``), its shapes data and COCO loader (``data/``), COCO mAP and the detection predictors
(``eval/``), the demo's training loop (``train_loop``), the run config, the CLI stages and the demo itself. The core
(``qatkit`` outside this package) never imports from here; these modules import the core like any user code does.

They need the ``apps`` extra (``pip install 'qatkit[apps]'``): torchvision (NMS, box IoU), Pillow (images),
faster-coco-eval (mAP) and matplotlib (the demo's report). Importing ``qatkit.apps`` without them fails here, naming
the extra, rather than deep inside a stage.
"""
from __future__ import annotations

from importlib.util import find_spec

# import name -> distribution name, for the message
APP_REQUIREMENTS = {"torchvision": "torchvision", "PIL": "pillow", "faster_coco_eval": "faster-coco-eval",
                    "matplotlib": "matplotlib"}


def missing_requirements() -> list[str]:
    """The distributions the applications need that this environment lacks (imports nothing)."""
    return [dist for name, dist in APP_REQUIREMENTS.items() if find_spec(name) is None]


_missing = missing_requirements()
if _missing:
    raise ImportError(f"qatkit's applications (the CLI, the demo) need {', '.join(_missing)}, not installed here: "
                      f"pip install 'qatkit[apps]'")
