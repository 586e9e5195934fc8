"""GPTQ: the column solver (``solver``) and the ``gptq`` algorithm plugin (``algorithm``)."""
