"""``quanta.mil``: a numpy reference runner for Core ML ML programs (a library: it registers no
plugin). ``quanta.mil.runner.run`` executes a converted or saved program on Linux, where Core ML
cannot; ``quanta.mil.program.load_program`` reads one; ``quanta.mil.optable`` holds the op table."""
