"""Files: the saved-model format, ``quanta.save`` / ``quanta.load``, models and data named by recipes,
atomic writes."""
