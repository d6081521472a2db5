"""Exercise checkers and their hidden solutions, one module per chapter.

Each module registers its exercises with :func:`flashlab.check.exercise`.
"""
