"""Training, evaluation and prediction around ``models`` and ``datasets``: optimizer groups, one epoch, COCO
evaluation gathered over ranks, the commands of ``main.py``."""
