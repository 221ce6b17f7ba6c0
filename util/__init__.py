"""Small single-purpose helpers that import nothing of the project above them: the config (``config``), the errors
``main.py`` prints (``errors``), checkpoints (``checkpoint``), process groups (``distributed``), progress lines
(``progress``), the one timer (``timing``), and images: reading, batching and drawing (``image_io``,
``image_batch``, ``draw``)."""
