"""Training a US-Net: the sandwich rule and in-place distillation (``sandwich``), the
optimization recipe (``recipe``), the ``usnet train`` loop (``trainer``) with its run config
(``config``), data (``data``) and run directory (``rundir``), and warm starts from trained weights
(``warm_start``, ``reorder``)."""
